-- Claim up to :n pending jobs of one model in one atomic statement:
-- highest priority first, then oldest, skipping jobs in retry backoff.
-- `+run_at` keeps the planner on gpu_jobs_claim, whose order is the claim's
-- (a seek, then LIMIT rows), rather than gpu_jobs_due, which would sort
-- every due job of the model on each claim. The UPDATE of claim_update.sql
-- follows.
WITH picked AS (
        SELECT rowid AS seq
          FROM gpu_jobs
         WHERE status = 'pending'
           AND model_type = :model
           AND +run_at <= :now
         ORDER BY priority DESC, created_at, rowid
         LIMIT :n)
