-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Return every job claimed by owner $2 (or by an owner below it, such as
-- "host/vision/3" below "host") to 'pending', leases or not.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE status = 'processing' AND lease_until IS NOT NULL
   AND (claimed_by = $2 OR left(claimed_by, length($2) + 1) = $2 || '/')
