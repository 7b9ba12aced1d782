-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Claim up to $3 pending jobs of model $2 in one statement: highest priority
-- first, then oldest, skipping jobs in retry backoff; SKIP LOCKED lets other
-- claimers pass. $4 claim id, $5 owner, $6 lease in seconds.
WITH picked AS (
    SELECT seq FROM gpu_jobs
     WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
     ORDER BY priority DESC, created_at, seq
     LIMIT $3
       FOR UPDATE SKIP LOCKED)
UPDATE gpu_jobs AS j
   SET status = 'processing', claim_id = $4, claimed_by = $5,
       lease_until = gpu_feeder_now($1) + $6, started_at = gpu_feeder_now($1),
       updated_at = gpu_feeder_now($1)
  FROM picked
 WHERE j.seq = picked.seq
RETURNING j.*
