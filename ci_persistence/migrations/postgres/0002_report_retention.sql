-- 0002: as SQLite's 0005 and 0006. pytest's summary of a job's run (the JSON of
-- ci_common.wire.ReportData; NULL when the tests never ran), and retention: when a finished
-- job lost its output and archive.

ALTER TABLE jobs ADD COLUMN report TEXT;
ALTER TABLE jobs ADD COLUMN pruned_at TIMESTAMPTZ;
CREATE INDEX jobs_prunable ON jobs (end_time) WHERE pruned_at IS NULL AND end_time IS NOT NULL;
