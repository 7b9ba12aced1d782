-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Return jobs whose lease has expired to 'pending'.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE status = 'processing' AND lease_until < gpu_feeder_now($1)
