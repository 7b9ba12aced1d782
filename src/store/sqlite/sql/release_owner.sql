-- Return every job claimed by one owner (or by an owner below it, such as
-- "host/vision/3" below "host") to 'pending', leases or not: a daemon
-- restarting after a crash, or a crashed dispatcher, knows those claims are dead.
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = :now
 WHERE status = 'processing'
   AND lease_until IS NOT NULL
   AND (claimed_by = :owner OR substr(claimed_by, 1, length(:owner) + 1) = :owner || '/');
