-- Next stage: finished jobs that name a follow-up model, so that the ones
-- whose follow-up is still to be created are found quickly after a restart.
CREATE INDEX gpu_jobs_then ON gpu_jobs (finished_at)
    WHERE then_model IS NOT NULL AND status = 'done';

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version
-- (schema_migrations itself is made by 0001_gpu_jobs.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (2, 'follow_ups', (julianday('now') - 2440587.5) * 86400.0);
