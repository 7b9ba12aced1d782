-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Claim the pending rows a grouped claim chose ($2, their seqs), in the
-- transaction that read them. $3 claim id, $4 owner, $5 lease in seconds.
WITH locked AS (
    SELECT seq FROM gpu_jobs
     WHERE seq = ANY($2) AND status = 'pending'
       FOR UPDATE SKIP LOCKED)
UPDATE gpu_jobs AS j
   SET status = 'processing', claim_id = $3, claimed_by = $4,
       lease_until = gpu_feeder_now($1) + $5, started_at = gpu_feeder_now($1),
       updated_at = gpu_feeder_now($1)
  FROM locked
 WHERE j.seq = locked.seq
RETURNING j.*
