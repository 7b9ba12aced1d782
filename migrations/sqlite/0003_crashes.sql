-- Poison-job quarantine: how many times a job's server went down while the
-- job was in flight. Counted apart from `attempts`, because a server that
-- is down must never make a job fail; a job that takes its server down
-- every time is failed once this reaches `health.poison_after_crashes`.
ALTER TABLE gpu_jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0 CHECK (crashes >= 0);

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version
-- (schema_migrations itself is made by 0001_gpu_jobs.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (3, 'crashes', (julianday('now') - 2440587.5) * 86400.0);
