-- 0001: users, API keys, jobs, their archives and their events.
-- Timestamps are ISO-8601 UTC text with microseconds, so text order is time order.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,                        -- uuid4
    name        TEXT NOT NULL,
    email       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    is_active   INTEGER NOT NULL DEFAULT 1,
    created_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,                      -- uuid4
    user_id       TEXT NOT NULL REFERENCES users (id),
    name          TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,                  -- hex SHA-256, never the key
    prefix        TEXT NOT NULL,
    is_active     INTEGER NOT NULL DEFAULT 1,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,                  -- uuid4
    user_id           TEXT NOT NULL REFERENCES users (id),
    status            TEXT NOT NULL
                      CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    created_at        TEXT NOT NULL,
    start_time        TEXT,
    end_time          TEXT,
    exit_code         INTEGER,
    success           INTEGER,
    reason            TEXT,
    timeout_seconds   REAL,
    archive_size      INTEGER NOT NULL,
    controller_id     TEXT,
    container_id      TEXT,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    log_cursor        INTEGER NOT NULL DEFAULT 0,
    output_bytes      INTEGER NOT NULL DEFAULT 0,       -- UTF-8 bytes of stored OUTPUT text
    dropped_bytes     INTEGER NOT NULL DEFAULT 0,
    next_seq          INTEGER NOT NULL DEFAULT 1,       -- seq of the job's next event
    marker_seq        INTEGER                           -- seq of the log-cap marker, if any
);
-- GET /jobs: the user's jobs, newest first.
CREATE INDEX jobs_user_created ON jobs (user_id, created_at DESC, id DESC);
-- claim_next_job and count_queued_jobs: only waiting jobs, oldest first.
CREATE INDEX jobs_waiting ON jobs (created_at, id)
    WHERE status = 'queued' AND controller_id IS NULL;
-- list_controller_jobs and the per-user fairness count: claimed jobs not yet finished.
CREATE INDEX jobs_active ON jobs (controller_id, user_id)
    WHERE status IN ('queued', 'running');

-- Kept apart from jobs so that listing jobs never reads archive pages.
CREATE TABLE job_archives (
    job_id  TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    data    BLOB NOT NULL
);

-- id is the relay's global cursor: AUTOINCREMENT never reuses an id, and ids are assigned
-- inside serialised write transactions, so id order is commit order.
CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('status', 'output', 'end')),
    stream      TEXT CHECK (stream IN ('stdout', 'stderr')),
    text        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (job_id, seq)
);
