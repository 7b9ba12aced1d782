-- Poison-job quarantine: how many times a job's server went down while the
-- job was in flight. Counted apart from `attempts`, because a server that
-- is down must never make a job fail; a job that takes its server down
-- every time is failed once this reaches `health.poison_after_crashes`.
ALTER TABLE gpu_jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0 CHECK (crashes >= 0);
