-- Which configured remote node sent the study (name, as matched by AE title and host at acceptance)
-- and from which address: results go back to that node only, never to a namesake on another host.
-- NULL for studies recorded before this migration and for senders accepted by accept_unknown_sources.
ALTER TABLE studies ADD COLUMN source_node TEXT;
ALTER TABLE studies ADD COLUMN source_host TEXT;

-- Per-destination retry plan: when this object was first tried (start of the retry window) and when
-- the next try is due (NULL once it is settled: sent, failed or dead).
ALTER TABLE deliveries ADD COLUMN first_attempt_at TEXT;
ALTER TABLE deliveries ADD COLUMN next_attempt_at TEXT;
