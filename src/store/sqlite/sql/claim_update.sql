-- The end of claim.sql and claim_rows.sql: set the rows they picked (a
-- `picked` CTE of rowids, `seq`) `processing` under the claim, if still pending.
UPDATE gpu_jobs
   SET status      = 'processing',
       claim_id    = :claim_id,
       claimed_by  = :owner,
       lease_until = :lease_until,
       started_at  = :now,
       updated_at  = :now
 WHERE rowid IN (SELECT seq FROM picked)
   AND status = 'pending'
RETURNING rowid AS seq, *;
