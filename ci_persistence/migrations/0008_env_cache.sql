-- Reserved for issue #10's environment cache (branch env-cache), which ships the real file
-- under this name: at the merge, take that branch's version. Empty here so that this branch's
-- index migration (0009) keeps the versions without a gap.
SELECT 1;
