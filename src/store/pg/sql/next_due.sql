SELECT run_at - gpu_feeder_now($1)
  FROM gpu_jobs
 WHERE status = 'pending' AND model_type = $2 AND run_at > gpu_feeder_now($1)
 ORDER BY run_at
 LIMIT 1
