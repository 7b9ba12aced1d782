-- gpu_daemons: the daemons using this queue, each with its heartbeat. A
-- daemon whose heartbeat is older than its own timeout is taken for dead:
-- the others return its claims to 'pending' without waiting for their
-- leases. A daemon that stops cleanly removes its row. (The PostgreSQL
-- queue, shared by several hosts, has the same table.)
CREATE TABLE gpu_daemons (
    -- queue.daemon_id: the prefix of every claim it makes.
    daemon_id    TEXT PRIMARY KEY NOT NULL CHECK (length(daemon_id) BETWEEN 1 AND 200),
    -- What it says about itself: host, pid, version (JSON).
    about        TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(about)),
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    -- Silent longer than this (seconds) means dead.
    timeout_s    REAL NOT NULL CHECK (timeout_s > 0)
);

-- gpu_results: result documents kept in the job database (results.store =
-- "database") instead of files. A done job's result_path reads
-- `db:<id in hex>`.
CREATE TABLE gpu_results (
    id         BLOB PRIMARY KEY NOT NULL CHECK (typeof(id) = 'blob' AND length(id) = 16),
    -- The result document (JSON, as the file store writes it).
    doc        BLOB NOT NULL,
    written_at REAL NOT NULL
);

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version
-- (schema_migrations itself is made by 0001_gpu_jobs.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (7, 'daemons_results', (julianday('now') - 2440587.5) * 86400.0);
