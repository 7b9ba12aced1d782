-- The end of fail.sql and crashed.sql: the claim of job $2 ends, if it is
-- the current one ($3), and the job's status, attempts and seconds until its
-- run_at come back (no row: the claim is stale).
       claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'
RETURNING status, attempts, run_at - gpu_feeder_now($1)
