-- Routing rules: which studies go to which destinations in which output profile. Evaluated in
-- position order (1 first); the first enabled rule whose conditions all hold decides. No rule
-- matching: the default (the sender, when it is a destination, plus every default destination).
-- match/action are JSON objects validated by dicom_node.pipeline.routing before they are saved.
CREATE TABLE routing_rules (
    name                TEXT PRIMARY KEY,
    position            INTEGER NOT NULL,
    match_json          TEXT NOT NULL,
    action_json         TEXT NOT NULL,
    description         TEXT NOT NULL DEFAULT '',
    enabled             INTEGER NOT NULL DEFAULT 1,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX routing_rules_position ON routing_rules (position);
