-- Audit trail: who did it (an account or OS user, for admin changes and logins), indexes for the
-- query filters, and the durable spool of events waiting to be forwarded to an ATNA repository.
ALTER TABLE audit_events ADD COLUMN user_name TEXT;
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_study ON audit_events (study_instance_uid);

-- One row while forwarding is configured (serve writes it at start, removes it when unconfigured):
-- every audit insert, from any process, queues its event id in audit_outbox in the same transaction.
CREATE TABLE audit_forwarding (
    target      TEXT PRIMARY KEY,
    enabled_at  TEXT NOT NULL
);

-- Events not yet confirmed received by the repository; the forwarder deletes a row once the
-- repository has read it (at-least-once; the event id is the de-duplication key on the wire).
CREATE TABLE audit_outbox (
    event_id    INTEGER PRIMARY KEY,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
);
