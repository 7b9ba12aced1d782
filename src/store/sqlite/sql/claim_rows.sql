-- Claim the pending rows a grouped claim chose (:rowids, a JSON array), in
-- the same transaction that read them.
UPDATE gpu_jobs
   SET status      = 'processing',
       claim_id    = :claim_id,
       claimed_by  = :owner,
       lease_until = :lease_until,
       started_at  = :now,
       updated_at  = :now
 WHERE rowid IN (SELECT value FROM json_each(:rowids))
   AND status = 'pending'
RETURNING rowid AS seq, *;
