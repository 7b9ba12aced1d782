-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Give claimed job $2 back without counting an attempt; only the current
-- claim ($3) may.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'
