-- Return every job claimed by one owner to 'pending', leases or not:
-- a daemon restarting after a crash knows its old claims are dead.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = :now
 WHERE status = 'processing'
   AND lease_until IS NOT NULL
   AND claimed_by = :owner;
