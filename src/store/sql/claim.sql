-- Claim up to :n pending jobs of one model in one atomic statement:
-- highest priority first, then oldest, skipping jobs in retry backoff.
UPDATE gpu_jobs
   SET status      = 'processing',
       claim_id    = :claim_id,
       claimed_by  = :owner,
       lease_until = :lease_until,
       started_at  = :now,
       updated_at  = :now
 WHERE rowid IN (
        SELECT rowid
          FROM gpu_jobs
         WHERE status = 'pending'
           AND model_type = :model
           AND run_at <= :now
         ORDER BY priority DESC, created_at, rowid
         LIMIT :n)
RETURNING rowid AS seq, *;
