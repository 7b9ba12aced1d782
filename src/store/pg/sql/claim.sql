-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Claim up to $6 pending jobs of model $5 in one statement: highest priority
-- first, then oldest, skipping jobs in retry backoff; SKIP LOCKED lets other
-- claimers pass. The UPDATE of claim_update.sql follows ($2 to $4).
WITH picked AS (
    SELECT seq FROM gpu_jobs
     WHERE status = 'pending' AND model_type = $5 AND run_at <= gpu_feeder_now($1)
     ORDER BY priority DESC, created_at, seq
     LIMIT $6
       FOR UPDATE SKIP LOCKED)
