-- 0004: as SQLite's 0008. The installed-environment cache (one row per Docker volume holding a
-- virtualenv) and the job option `ci submit test --no-cache`.

ALTER TABLE jobs ADD COLUMN no_cache BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE env_cache (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    user_id             TEXT COLLATE "C" NOT NULL,
    engine_id           TEXT COLLATE "C" NOT NULL,
    image_id            TEXT COLLATE "C" NOT NULL,
    requirements_sha256 TEXT COLLATE "C" NOT NULL,
    volume              TEXT COLLATE "C" NOT NULL UNIQUE,
    state               TEXT NOT NULL CHECK (state IN ('building', 'ready', 'removing')),
    job_id              TEXT COLLATE "C" NOT NULL,
    python_version      TEXT NOT NULL DEFAULT '',
    size_bytes          BIGINT NOT NULL DEFAULT 0,
    created_at          TIMESTAMPTZ NOT NULL,
    built_at            TIMESTAMPTZ,
    last_used_at        TIMESTAMPTZ
);
CREATE INDEX env_cache_key ON env_cache (user_id, engine_id, image_id, requirements_sha256);
