-- Analyze workers on other hosts (issue 23): a worker that has no shared data_dir and no database
-- reaches the node over HTTP with a worker token. Only the SHA-256 of the 256-bit secret is kept.
-- A worker token may read over DICOMweb (WADO-RS) the study it has claimed and report analyses, nothing else.
CREATE TABLE worker_tokens (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    last_used_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);
