-- DICOM TLS per remote node as SCU (the existing `tls` column switches it on): PEM files of the CAs
-- trusted for its server certificate (NULL: the system's CAs), our client certificate and key for it
-- (NULL: none presented), and whether its certificate and host name are verified (TRUE: required).
ALTER TABLE remote_nodes ADD COLUMN tls_ca_file TEXT;
ALTER TABLE remote_nodes ADD COLUMN tls_cert_file TEXT;
ALTER TABLE remote_nodes ADD COLUMN tls_key_file TEXT;
ALTER TABLE remote_nodes ADD COLUMN tls_verify_peer BOOLEAN NOT NULL DEFAULT TRUE;
