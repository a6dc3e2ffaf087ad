-- 0006: retention. Finished jobs older than CI_RETENTION_DAYS lose their output and archive;
-- the job row (status, times, result, report) stays, marked with when that happened.

ALTER TABLE jobs ADD COLUMN pruned_at TEXT;
-- prune_jobs: finished jobs not pruned yet, oldest end first.
CREATE INDEX jobs_prunable ON jobs (end_time) WHERE pruned_at IS NULL AND end_time IS NOT NULL;
