-- The end of fail.sql and crashed.sql: the claim ends, if it is the current
-- one, and the job's status, attempts and run_at after it come back (no row:
-- the claim is stale).
       claim_id    = NULL,
       lease_until = NULL,
       updated_at  = :now
 WHERE id = :id
   AND claim_id = :claim_id
   AND status = 'processing'
RETURNING status, attempts, run_at;
