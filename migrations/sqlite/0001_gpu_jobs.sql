-- gpu_jobs: the durable job queue.
--
-- Other programs may insert rows directly. The plan's minimal insert works
-- as is, every other column having a default:
--   INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_path, created_at)
--   VALUES (randomblob(16), 'x', 'vision', '/path/p.json', strftime('%s','now'));
--
-- Times are unix seconds: created_at an integer (as strftime('%s') gives),
-- the others REAL with millisecond fractions.

CREATE TABLE gpu_jobs (
    -- 16 random bytes (randomblob(16)); shown as 32 hex digits.
    id                BLOB PRIMARY KEY NOT NULL
                      CHECK (typeof(id) = 'blob' AND length(id) = 16),
    -- Idempotence key with model_type: hex SHA-256 of the payload content.
    payload_sha256    TEXT NOT NULL CHECK (length(payload_sha256) > 0),
    model_type        TEXT NOT NULL CHECK (model_type IN ('vision', 'think')),
    -- The payload: a JSON file, or (for jobs submitted without one) inline JSON.
    payload_path      TEXT,
    payload_inline    TEXT,
    created_at        INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
                      CHECK (typeof(created_at) IN ('integer', 'real')),
    status            TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'processing', 'done', 'failed', 'cancelled')),
    -- Higher runs first; ties go to the oldest.
    priority          INTEGER NOT NULL DEFAULT 0,
    -- Attempts that ended (in success or failure); reclaims and releases do not count.
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    -- Not claimable before this time (retry backoff).
    run_at            REAL NOT NULL DEFAULT 0,
    -- The current claim: its token, its holder, and when it expires.
    claim_id          TEXT,
    claimed_by        TEXT,
    lease_until       REAL,
    -- Fragments: the parent they fan in to, their position and count.
    -- A parent has total_fragments set and parent_id NULL; it waits in
    -- 'processing' until its fragments are done.
    parent_id         BLOB,
    fragment_index    INTEGER,
    total_fragments   INTEGER CHECK (total_fragments IS NULL OR total_fragments >= 1),
    -- Next stage: the job this one was created from, and the model of the
    -- follow-up to create when this one is done.
    follows           BLOB,
    then_model        TEXT CHECK (then_model IS NULL OR then_model IN ('vision', 'think')),
    -- Outcome.
    result_path       TEXT,
    error             TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_ms        INTEGER,
    started_at        REAL,
    finished_at       REAL,
    updated_at        REAL,
    CHECK (payload_path IS NOT NULL OR payload_inline IS NOT NULL),
    CHECK ((parent_id IS NULL) = (fragment_index IS NULL))
);

-- Claim: pending jobs of one model, by priority then age (rowid breaks ties).
CREATE INDEX gpu_jobs_claim ON gpu_jobs (model_type, priority DESC, created_at)
    WHERE status = 'pending';

-- Reclaim of expired leases, and release of a dead daemon's claims.
CREATE INDEX gpu_jobs_lease ON gpu_jobs (lease_until) WHERE status = 'processing';

-- Idempotence: one job per model and payload (fragments and follow-ups excepted).
CREATE UNIQUE INDEX gpu_jobs_payload ON gpu_jobs (model_type, payload_sha256)
    WHERE parent_id IS NULL AND follows IS NULL;

-- Fan-in: a parent's fragments, in order; one row per position.
CREATE UNIQUE INDEX gpu_jobs_fragments ON gpu_jobs (parent_id, fragment_index)
    WHERE parent_id IS NOT NULL;

-- Next stage: at most one follow-up per job.
CREATE UNIQUE INDEX gpu_jobs_follows ON gpu_jobs (follows) WHERE follows IS NOT NULL;

-- Stats per model and status, and the oldest pending job.
CREATE INDEX gpu_jobs_status ON gpu_jobs (model_type, status, created_at);

-- Listing, newest first.
CREATE INDEX gpu_jobs_created ON gpu_jobs (created_at);

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version.
-- The table of marks is made here, once; every later file adds its row.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
);
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (1, 'gpu_jobs', (julianday('now') - 2440587.5) * 86400.0);
