-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Claim the pending rows a grouped claim chose ($5, their seqs), in the
-- transaction that read them. The UPDATE of claim_update.sql follows ($2 to
-- $4).
WITH picked AS (
    SELECT seq FROM gpu_jobs
     WHERE seq = ANY($5) AND status = 'pending'
       FOR UPDATE SKIP LOCKED)
