-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- How long until the earliest run_at in the future among model $2's pending
-- jobs.
SELECT run_at - gpu_feeder_now($1)
  FROM gpu_jobs
 WHERE status = 'pending' AND model_type = $2 AND run_at > gpu_feeder_now($1)
 ORDER BY run_at
 LIMIT 1
