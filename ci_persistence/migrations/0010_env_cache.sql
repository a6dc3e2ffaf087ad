-- 0008: the installed-environment cache (ci_controller/envcache.py). One row per Docker volume
-- holding a virtualenv, keyed by user, engine, runner image id and requirements.txt's hash;
-- `ci-admin` lists and prunes these rows without talking to Docker, and the controller of the
-- entry's engine removes the volumes of rows marked `removing`. And the job option
-- `ci submit test --no-cache`.

ALTER TABLE jobs ADD COLUMN no_cache INTEGER NOT NULL DEFAULT 0;

CREATE TABLE env_cache (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    engine_id           TEXT NOT NULL,
    image_id            TEXT NOT NULL,
    requirements_sha256 TEXT NOT NULL,
    volume              TEXT NOT NULL UNIQUE,
    state               TEXT NOT NULL CHECK (state IN ('building', 'ready', 'removing')),
    job_id              TEXT NOT NULL,
    python_version      TEXT NOT NULL DEFAULT '',
    size_bytes          INTEGER NOT NULL DEFAULT 0,
    created_at          TEXT NOT NULL,
    built_at            TEXT,
    last_used_at        TEXT
);
-- find_env: the ready entry of one key.
CREATE INDEX env_cache_key ON env_cache (user_id, engine_id, image_id, requirements_sha256);
