-- 0004: the Docker engine each controller runs its containers on. When a controller's lease
-- expires, a live controller on the same engine adopts its running jobs' containers; where no
-- live controller shares that engine, its running jobs fail as `controller lost`.

ALTER TABLE controllers ADD COLUMN engine_id TEXT NOT NULL DEFAULT '';

-- The lease's length as its holder promised it (CI_CONTROLLER_LEASE where it runs): everyone
-- (other controllers, ci-admin) then agrees on when it expires, whatever their own setting.
ALTER TABLE controllers ADD COLUMN lease_s REAL NOT NULL DEFAULT 60;
