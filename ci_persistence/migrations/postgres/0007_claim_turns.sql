-- 0007: as SQLite's 0011. Each user's last claim turn (0: never), for round-robin ties.
ALTER TABLE users ADD COLUMN claim_turn bigint NOT NULL DEFAULT 0;
