-- 0008: when a claimed job's controller was about to create its container (fenced by the
-- lease, before the container could start). A take-over by a controller on another engine
-- fails such a job as `controller lost` (it may be running) instead of requeueing it.
ALTER TABLE jobs ADD COLUMN start_attempted_at TEXT;
