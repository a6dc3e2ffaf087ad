-- 0003: as SQLite's 0007. The pytest arguments given after `--` (a JSON list of strings), the
-- Python version the job runs on (NULL: from before the choice, the default), and pytest's
-- JUnit XML apart from the job row (removed by retention with the output).
ALTER TABLE jobs ADD COLUMN pytest_args TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN python_version TEXT;

CREATE TABLE job_junit (
    job_id TEXT COLLATE "C" PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    xml TEXT NOT NULL
);
