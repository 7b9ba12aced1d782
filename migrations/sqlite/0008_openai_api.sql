-- The OpenAI-compatible API: uploaded files, batches, and the job each
-- line of a batch became. A batch's progress is read from its jobs, so it
-- survives a restart of the daemon.
CREATE TABLE api_files (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    -- Non-empty lines (requests), for a batch input.
    lines      INTEGER NOT NULL,
    created_at REAL NOT NULL,
    -- The content, under api.files_dir.
    path       TEXT NOT NULL
);

CREATE TABLE api_batches (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    -- validating, in_progress, finalizing, completed, failed, expired,
    -- cancelling, cancelled.
    status        TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    created_at    REAL NOT NULL,
    -- The batch object as the API shows it (JSON).
    doc           TEXT NOT NULL CHECK (json_valid(doc))
);
CREATE INDEX api_batches_status ON api_batches (status);
CREATE INDEX api_batches_input ON api_batches (input_file_id);

CREATE TABLE api_batch_lines (
    batch_id  TEXT NOT NULL,
    -- 1-based line number in the input file.
    line      INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    job_id    BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)
);

-- Mark: this file records that it was applied (see 0007_daemons_results.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (8, 'openai_api', (julianday('now') - 2440587.5) * 86400.0);
