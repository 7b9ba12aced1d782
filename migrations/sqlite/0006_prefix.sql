-- Prefix keys: jobs whose prompts start alike (the same image, the same
-- system prompt and leading text, the fragments of one parent) carry the
-- same key, so that a claim can hand them out together while the server's
-- prefix cache still holds what they share (`dispatch.prefix_grouping`).
-- 32 hex digits, or a parent's id for a fragment. NULL for rows written
-- before this version and by programs that do not set it: each is a group
-- of its own, claimed in plain order.
ALTER TABLE gpu_jobs ADD COLUMN prefix_key TEXT
    CHECK (prefix_key IS NULL OR length(prefix_key) BETWEEN 1 AND 128);

-- A grouped claim fetches every due job of the keys just sent to an
-- instance with one seek per key.
CREATE INDEX gpu_jobs_prefix ON gpu_jobs (model_type, prefix_key)
    WHERE status = 'pending' AND prefix_key IS NOT NULL;

-- Mark: this file records that it was applied, so that a database built by
-- running the files through the sqlite3 CLI is known to be at this version
-- (schema_migrations itself is made by 0001_gpu_jobs.sql).
INSERT OR IGNORE INTO schema_migrations (version, name, applied_at)
VALUES (6, 'prefix', (julianday('now') - 2440587.5) * 86400.0);
