-- AnatomiX node state, SQLite dialect (embedded mode). Times are UTC ISO-8601 text with
-- microseconds ('2026-01-31T12:00:00.000000+00:00'), so text order is time order.

CREATE TABLE remote_nodes (
    name                TEXT PRIMARY KEY,
    ae_title            TEXT NOT NULL,
    host                TEXT NOT NULL,
    port                INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    role                TEXT NOT NULL CHECK (role IN ('source', 'destination', 'both')),
    profile             TEXT NOT NULL,
    quiet_period_s      REAL,
    complete_on_release INTEGER NOT NULL DEFAULT 0,
    default_destination INTEGER NOT NULL DEFAULT 0,
    tls                 INTEGER NOT NULL DEFAULT 0,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
CREATE INDEX remote_nodes_ae_title ON remote_nodes (ae_title);

CREATE TABLE studies (
    study_instance_uid  TEXT PRIMARY KEY,
    version             INTEGER NOT NULL DEFAULT 1,
    state               TEXT NOT NULL,
    source_ae           TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    last_received_at    TEXT NOT NULL,
    error               TEXT
);
CREATE INDEX studies_state ON studies (state);

-- One row per state entered, per analysis version: how long each stage took.
CREATE TABLE study_state_history (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid) ON DELETE CASCADE,
    version             INTEGER NOT NULL,
    state               TEXT NOT NULL,
    entered_at          TEXT NOT NULL
);
CREATE INDEX study_state_history_study ON study_state_history (study_instance_uid, version);

-- One row per distinct byte content of a SOP instance (same UID + other bytes = second row).
CREATE TABLE instances (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid) ON DELETE CASCADE,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    received_at         TEXT NOT NULL,
    study_version       INTEGER NOT NULL,
    state               TEXT NOT NULL DEFAULT 'received',
    reason              TEXT,
    UNIQUE (sop_instance_uid, sha256)
);
CREATE INDEX instances_study ON instances (study_instance_uid, study_version);

CREATE TABLE analyses (
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid) ON DELETE CASCADE,
    study_version       INTEGER NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('analyzed', 'failed')),
    result_json         TEXT,
    error               TEXT,
    created_at          TEXT NOT NULL,
    PRIMARY KEY (study_instance_uid, study_version, sop_instance_uid)
);

CREATE TABLE produced_objects (
    sop_instance_uid        TEXT PRIMARY KEY,
    study_instance_uid      TEXT NOT NULL REFERENCES studies (study_instance_uid) ON DELETE CASCADE,
    study_version           INTEGER NOT NULL,
    source_sop_instance_uid TEXT NOT NULL,
    kind                    TEXT NOT NULL,
    sop_class_uid           TEXT NOT NULL,
    path                    TEXT NOT NULL,
    created_at              TEXT NOT NULL
);
CREATE INDEX produced_objects_study ON produced_objects (study_instance_uid, study_version);

CREATE TABLE deliveries (
    study_instance_uid  TEXT NOT NULL REFERENCES studies (study_instance_uid) ON DELETE CASCADE,
    study_version       INTEGER NOT NULL,
    destination         TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'retrying', 'failed', 'dead')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_status         INTEGER,
    error               TEXT,
    updated_at          TEXT NOT NULL,
    PRIMARY KEY (study_instance_uid, study_version, destination, sop_instance_uid)
);
CREATE INDEX deliveries_status ON deliveries (status);

-- Append-only audit trail. No pixel data; PHI only where the audit purpose needs it.
CREATE TABLE audit_events (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    at                  TEXT NOT NULL,
    event               TEXT NOT NULL,
    calling_ae          TEXT,
    called_ae           TEXT,
    peer_host           TEXT,
    study_instance_uid  TEXT,
    sop_instance_uid    TEXT,
    detail              TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_event ON audit_events (event);
