-- 0005: pytest's summary of a job's run (counts, failing and slowest tests), as the JSON of
-- ci_common.wire.ReportData; NULL when the tests never ran.

ALTER TABLE jobs ADD COLUMN report TEXT;
