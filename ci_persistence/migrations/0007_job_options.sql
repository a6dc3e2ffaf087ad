-- 0007: what a submission asks for beyond the project (issue #11), and pytest's JUnit XML.
-- pytest_args: the arguments given after `--`, a JSON list of strings ('[]': none).
-- python_version: the Python the job runs on (NULL for jobs from before the choice: the default).
ALTER TABLE jobs ADD COLUMN pytest_args TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN python_version TEXT;

-- The report as pytest wrote it, apart from the job row (up to a few MB, read only on request).
-- Retention removes it with the output.
CREATE TABLE job_junit (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    xml TEXT NOT NULL
);
