-- Placeholder kept only on branch rworker so that its migrations have no gap (0013 needs 0011 and 0012).
-- Delete this file when the real 0011 migration of that branch is merged.
SELECT 1;
