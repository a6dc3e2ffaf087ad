-- Reserved for issue #11's job options (branch issue-11-cli), which ships the real file under
-- this name: at the merge, take that branch's version. Empty here so that this branch's
-- env-cache migration keeps the versions without a gap.
SELECT 1;
