-- Per remote node DICOM TLS, both directions (issue 10):
-- tls_client_certificate: as a source, 'required' = the SCP refuses its associations unless it
-- presented a trusted client certificate on the TLS port; 'optional' = the port's rule alone.
-- tls_check_hostname: as a destination, check that its certificate names the host we connect to
-- (the certificate chain is still verified while tls_verify_peer is on).
ALTER TABLE remote_nodes ADD COLUMN tls_client_certificate TEXT NOT NULL DEFAULT 'optional';
ALTER TABLE remote_nodes ADD COLUMN tls_check_hostname BOOLEAN NOT NULL DEFAULT TRUE;
-- What each analyze worker process last reported about its model (at warm-up, then periodically):
-- /readyz is ready only while some worker reported a usable model recently; /api/status lists them.
CREATE TABLE worker_reports (
    name TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    pid INTEGER NOT NULL,
    queues TEXT NOT NULL,
    model_ok BOOLEAN NOT NULL,
    model_name TEXT,
    model_version TEXT,
    model_digest TEXT,
    demo_weights BOOLEAN,
    device TEXT,
    load_seconds DOUBLE PRECISION,
    error TEXT,
    started_at TIMESTAMPTZ NOT NULL,
    last_seen_at TIMESTAMPTZ NOT NULL
);
