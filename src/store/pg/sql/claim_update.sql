-- The end of claim.sql and claim_rows.sql: set the rows they picked (a
-- `picked` CTE of seqs) `processing` under claim id $2, for owner $3, with a
-- lease of $4 seconds.
UPDATE gpu_jobs AS j
   SET status = 'processing', claim_id = $2, claimed_by = $3,
       lease_until = gpu_feeder_now($1) + $4, started_at = gpu_feeder_now($1),
       updated_at = gpu_feeder_now($1)
  FROM picked
 WHERE j.seq = picked.seq
RETURNING j.*
