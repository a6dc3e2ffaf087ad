-- 0005: as SQLite's 0009. A user's jobs in one status, newest first, and their count, from
-- one index instead of every job of the user.
CREATE INDEX jobs_user_status_created ON jobs (user_id, status, created_at DESC, id DESC);
