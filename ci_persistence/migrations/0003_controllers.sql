-- 0003: controller leases. One row per controller id: who holds it (host, pid, version), since
-- when, and its latest heartbeat. A controller refuses to start with an id whose lease is fresh
-- and held by someone else; a graceful stop marks the lease stopped so a restart is immediate.

CREATE TABLE controllers (
    id            TEXT PRIMARY KEY,                      -- CI_CONTROLLER_ID
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    version       TEXT NOT NULL,
    token         TEXT NOT NULL,                         -- random, new at every acquisition
    started_at    TEXT NOT NULL,
    heartbeat_at  TEXT NOT NULL,
    stopped       INTEGER NOT NULL DEFAULT 0
);
