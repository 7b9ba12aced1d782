-- Due work: the earliest future run_at among one model's pending jobs (jobs
-- waiting out a retry backoff, or inserted by another program to run
-- later), found with one index seek, so that the daemon wakes exactly when
-- such a job comes due, whoever scheduled it.
CREATE INDEX gpu_jobs_due ON gpu_jobs (model_type, run_at) WHERE status = 'pending';

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version
-- (schema_migrations itself is made by 0001_gpu_jobs.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (4, 'due', (julianday('now') - 2440587.5) * 86400.0);
