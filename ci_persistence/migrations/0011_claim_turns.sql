-- 0011: each user's last claim turn, so ties between users with as many busy jobs go to the
-- one served least recently (round robin) rather than to the oldest job: a user's long burst
-- no longer wins every tie against someone whose first job is still installing. 0: never.
ALTER TABLE users ADD COLUMN claim_turn INTEGER NOT NULL DEFAULT 0;
