-- Destination health (issue 21): per destination, when a delivery attempt last succeeded and last
-- failed, and why. Written by the deliver workers after each association attempt; read by the CLI
-- (`ae list`), the console, /metrics and the operations API, beside the counts of waiting objects.
CREATE TABLE destination_health (
    destination TEXT PRIMARY KEY,
    last_success_at TEXT,
    last_failure_at TEXT,
    last_failure_reason TEXT
);
CREATE INDEX deliveries_destination_status ON deliveries (destination, status);
