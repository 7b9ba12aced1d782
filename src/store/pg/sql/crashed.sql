-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Job $2's server went down while it was in flight; only the current claim
-- ($3) may record it. Back to 'pending' with the crash counted, or 'failed'
-- with error $5 as a poison job at the $4-th crash. The end of settled.sql
-- follows.
UPDATE gpu_jobs
   SET crashes     = crashes + 1,
       status      = CASE WHEN crashes + 1 >= $4 THEN 'failed' ELSE 'pending' END,
       finished_at = CASE WHEN crashes + 1 >= $4 THEN gpu_feeder_now($1) ELSE NULL END,
       error       = CASE WHEN crashes + 1 >= $4 THEN $5 ELSE error END,
