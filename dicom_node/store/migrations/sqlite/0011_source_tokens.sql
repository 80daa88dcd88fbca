-- STOW-RS (issue 23): tokens bound to a source node. A token stores only as its node (the sender,
-- as an AE title and host are for C-STORE); only the SHA-256 of the 256-bit secret is kept.
CREATE TABLE source_tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_name TEXT NOT NULL REFERENCES remote_nodes (name) ON DELETE CASCADE,
    label TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at TEXT
);
CREATE INDEX source_tokens_node ON source_tokens (node_name);
