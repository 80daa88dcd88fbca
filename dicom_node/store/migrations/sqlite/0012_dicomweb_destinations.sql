-- DICOMweb destinations (issue 23): a remote node with a base URL receives results by STOW-RS instead
-- of C-STORE, and is echoed by a QIDO-RS query. The credentials stay in files the deliver workers
-- read at each attempt (never in the database): auth_token_file holds a bearer token, basic_auth_file
-- one line user:password. An https URL's server certificate is checked against tls_ca_file (NULL:
-- the system's CAs). host and port repeat the URL's, for the lists and the audit trail.
ALTER TABLE remote_nodes ADD COLUMN url TEXT;
ALTER TABLE remote_nodes ADD COLUMN auth_token_file TEXT;
ALTER TABLE remote_nodes ADD COLUMN basic_auth_file TEXT;
