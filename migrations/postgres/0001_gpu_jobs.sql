-- gpu_jobs on PostgreSQL: the durable job queue shared by the daemons of
-- several GPU hosts. The same columns, meanings and rules as the SQLite
-- schema (migrations/0001_gpu_jobs.sql and its successors), in PostgreSQL
-- types.
--
-- Other programs may insert rows directly. Every column but the plan's
-- five has a default, and so do id and created_at:
--   INSERT INTO gpu_jobs (payload_sha256, model_type, payload_path)
--   VALUES ('x', 'vision', '/path/p.json');
-- The insert wakes the daemons at once (0003_notify.sql).
--
-- Times are unix seconds (double precision), read from the database's
-- clock: every daemon judges leases, backoffs and heartbeats by it, never
-- by its own host's clock.

-- "Now" as unix seconds: the database's clock (at the start of the
-- transaction) when `at` is NULL, as every daemon in service passes it;
-- `at` itself otherwise, for tests that set the time.
CREATE FUNCTION gpu_feeder_now(at double precision) RETURNS double precision
    LANGUAGE sql STABLE
    AS $$ SELECT COALESCE(at, extract(epoch FROM now())::double precision) $$;

CREATE TABLE gpu_jobs (
    -- 16 random bytes; shown as 32 hex digits.
    id                bytea PRIMARY KEY
                      DEFAULT decode(replace(gen_random_uuid()::text, '-', ''), 'hex')
                      CHECK (length(id) = 16),
    -- Insertion order: breaks ties between jobs created in the same instant.
    seq               bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    -- Idempotence key with model_type: hex SHA-256 of the payload content.
    payload_sha256    text NOT NULL CHECK (length(payload_sha256) > 0),
    model_type        text NOT NULL CHECK (model_type IN ('vision', 'think')),
    -- The payload: a JSON file, or (for jobs submitted without one) inline JSON.
    payload_path      text,
    payload_inline    text,
    created_at        double precision NOT NULL DEFAULT extract(epoch FROM now()),
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'processing', 'done', 'failed', 'cancelled')),
    -- Higher runs first; ties go to the oldest.
    priority          bigint NOT NULL DEFAULT 0,
    -- Attempts that ended (in success or failure); reclaims and releases do not count.
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    -- Times the job's server went down while it was in flight.
    crashes           integer NOT NULL DEFAULT 0 CHECK (crashes >= 0),
    -- Not claimable before this time (retry backoff, or scheduled ahead).
    run_at            double precision NOT NULL DEFAULT 0,
    -- The current claim: its token, its holder (`DAEMON/instance/n`), and
    -- when it expires.
    claim_id          text,
    claimed_by        text,
    lease_until       double precision,
    -- Fragments: the parent they fan in to, their position and count. A
    -- parent has total_fragments set and parent_id NULL; it waits in
    -- 'processing' until its fragments are done.
    parent_id         bytea,
    fragment_index    integer,
    total_fragments   integer CHECK (total_fragments IS NULL OR total_fragments >= 1),
    -- Where a fragment sits in its parent (JSON: {"tokens": [s, e]} or {"tile": {…}}).
    place             jsonb,
    -- Jobs whose prompts start alike share a key (see dispatch.prefix_grouping).
    prefix_key        text CHECK (prefix_key IS NULL OR length(prefix_key) BETWEEN 1 AND 128),
    -- Next stage: the job this one was created from, and the model of the
    -- follow-up to create when this one is done.
    follows           bytea,
    then_model        text CHECK (then_model IS NULL OR then_model IN ('vision', 'think')),
    -- Outcome. result_path is a reference: a file path, or `db:<id>` for a
    -- row of gpu_results.
    result_path       text,
    error             text,
    prompt_tokens     bigint,
    completion_tokens bigint,
    latency_ms        bigint,
    started_at        double precision,
    finished_at       double precision,
    updated_at        double precision,
    CHECK (payload_path IS NOT NULL OR payload_inline IS NOT NULL),
    CHECK ((parent_id IS NULL) = (fragment_index IS NULL))
);

-- Claim: pending jobs of one model, by priority then age.
CREATE INDEX gpu_jobs_claim ON gpu_jobs (model_type, priority DESC, created_at, seq)
    WHERE status = 'pending';
-- Jobs coming due (backoff, scheduled ahead).
CREATE INDEX gpu_jobs_due ON gpu_jobs (model_type, run_at) WHERE status = 'pending';
-- Reclaim of expired leases, and release of a dead daemon's claims.
CREATE INDEX gpu_jobs_lease ON gpu_jobs (lease_until) WHERE status = 'processing';
CREATE INDEX gpu_jobs_claimed_by ON gpu_jobs (claimed_by) WHERE status = 'processing';
-- Idempotence: one job per model and payload (fragments and follow-ups excepted).
CREATE UNIQUE INDEX gpu_jobs_payload ON gpu_jobs (model_type, payload_sha256)
    WHERE parent_id IS NULL AND follows IS NULL;
-- Fan-in: a parent's fragments, in order; one row per position.
CREATE UNIQUE INDEX gpu_jobs_fragments ON gpu_jobs (parent_id, fragment_index)
    WHERE parent_id IS NOT NULL;
-- Next stage: at most one follow-up per job.
CREATE UNIQUE INDEX gpu_jobs_follows ON gpu_jobs (follows) WHERE follows IS NOT NULL;
-- Finished jobs that name a follow-up model.
CREATE INDEX gpu_jobs_then ON gpu_jobs (finished_at)
    WHERE then_model IS NOT NULL AND status = 'done';
-- Parents waiting on their fragments.
CREATE INDEX gpu_jobs_parents ON gpu_jobs (created_at)
    WHERE status = 'processing' AND parent_id IS NULL AND total_fragments IS NOT NULL;
-- A grouped claim fetches every due job of a warm key.
CREATE INDEX gpu_jobs_prefix ON gpu_jobs (model_type, prefix_key)
    WHERE status = 'pending' AND prefix_key IS NOT NULL;
-- Stats per model and status; listing, newest first.
CREATE INDEX gpu_jobs_status ON gpu_jobs (model_type, status, created_at);
CREATE INDEX gpu_jobs_created ON gpu_jobs (created_at);
