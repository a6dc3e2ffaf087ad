-- 0004: as SQLite's 0008. When a claimed job's controller was about to create its container
-- (fenced by the lease, before it could start): a take-over from another engine fails such a
-- job as `controller lost` instead of requeueing it.
ALTER TABLE jobs ADD COLUMN start_attempted_at TIMESTAMPTZ;
