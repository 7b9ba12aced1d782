-- Return jobs whose lease has expired to 'pending' (their holder is gone or stuck).
-- Parents waiting on fragments hold no lease and are not touched.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = :now
 WHERE status = 'processing'
   AND lease_until < :now;
