-- Give a claimed job back without counting an attempt; only the current claim may.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = :now
 WHERE id = :id
   AND claim_id = :claim_id
   AND status = 'processing';
