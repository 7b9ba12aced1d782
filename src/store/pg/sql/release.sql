UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'
