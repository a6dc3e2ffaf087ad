-- 0001 (PostgreSQL): the schema SQLite's migrations 0001-0004 build, in PostgreSQL's types.
-- One script, run in one transaction under the migration lock (ci_persistence/pg_migrate.py).
-- Keys are COLLATE "C" so that ordering by them is byte order, as in SQLite.

-- Email uniqueness folds ASCII letters only, exactly like SQLite's COLLATE NOCASE.
CREATE FUNCTION ci_fold(text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT translate($1, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') $$;

CREATE TABLE users (
    id          TEXT COLLATE "C" PRIMARY KEY,                -- uuid4
    n           BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,  -- insertion order (ties in time)
    name        TEXT NOT NULL,
    email       TEXT NOT NULL,
    is_active   BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX users_email ON users (ci_fold(email));

CREATE TABLE api_keys (
    id            TEXT COLLATE "C" PRIMARY KEY,              -- uuid4
    n             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    user_id       TEXT COLLATE "C" NOT NULL REFERENCES users (id),
    name          TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,                      -- hex SHA-256, never the key
    prefix        TEXT NOT NULL,
    is_active     BOOLEAN NOT NULL DEFAULT TRUE,
    created_at    TIMESTAMPTZ NOT NULL,
    last_used_at  TIMESTAMPTZ
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE jobs (
    id                TEXT COLLATE "C" PRIMARY KEY,          -- uuid4
    user_id           TEXT COLLATE "C" NOT NULL REFERENCES users (id),
    status            TEXT NOT NULL
                      CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    created_at        TIMESTAMPTZ NOT NULL,
    start_time        TIMESTAMPTZ,
    end_time          TIMESTAMPTZ,
    exit_code         INTEGER,
    success           BOOLEAN,
    reason            TEXT,
    timeout_seconds   DOUBLE PRECISION,
    archive_size      BIGINT NOT NULL,
    controller_id     TEXT COLLATE "C",
    container_id      TEXT,
    cancel_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    log_cursor        BIGINT NOT NULL DEFAULT 0,
    output_bytes      BIGINT NOT NULL DEFAULT 0,             -- UTF-8 bytes of stored OUTPUT text
    dropped_bytes     BIGINT NOT NULL DEFAULT 0,
    next_seq          BIGINT NOT NULL DEFAULT 1,             -- seq of the job's next event
    marker_seq        BIGINT                                 -- seq of the log-cap marker, if any
);
CREATE INDEX jobs_user_created ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX jobs_waiting ON jobs (created_at, id)
    WHERE status = 'queued' AND controller_id IS NULL;
CREATE INDEX jobs_active ON jobs (controller_id, user_id)
    WHERE status IN ('queued', 'running');

CREATE TABLE job_archives (
    job_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    data    BYTEA NOT NULL
);

-- A sequence hands out ids at insert, not at commit, so id order is not commit order here.
-- xid is the writing transaction: poll_events reads in (xid, id) order and only rows of
-- transactions older than every one still running, a prefix that can no longer grow.
-- text is UTF-8 in BYTEA because PostgreSQL's TEXT cannot hold NUL, and job output can.
CREATE TABLE job_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid         XID8 NOT NULL DEFAULT pg_current_xact_id(),
    job_id      TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('status', 'output', 'end')),
    stream      TEXT CHECK (stream IN ('stdout', 'stderr')),
    text        BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (job_id, seq)
);
CREATE INDEX job_events_commit_order ON job_events (xid, id);

-- The installation's identity, random, made once with the database (SQLite's 0002).
CREATE TABLE installation (
    id  TEXT PRIMARY KEY                                     -- 32 hex digits, random
);
INSERT INTO installation (id) VALUES (replace(gen_random_uuid()::text, '-', ''));

-- Controller leases (SQLite's 0003 and 0004).
CREATE TABLE controllers (
    id            TEXT COLLATE "C" PRIMARY KEY,              -- CI_CONTROLLER_ID
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    version       TEXT NOT NULL,
    token         TEXT NOT NULL,                             -- random, new at every acquisition
    started_at    TIMESTAMPTZ NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL,
    stopped       BOOLEAN NOT NULL DEFAULT FALSE,
    engine_id     TEXT NOT NULL DEFAULT '',
    lease_s       DOUBLE PRECISION NOT NULL DEFAULT 60
);
