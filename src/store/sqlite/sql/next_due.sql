-- The earliest run_at after :now among one model's pending jobs: when the
-- next job waiting out a backoff (or scheduled ahead by another program)
-- comes due. One seek on the gpu_jobs_due index.
SELECT run_at
  FROM gpu_jobs
 WHERE status = 'pending'
   AND model_type = :model
   AND run_at > :now
 ORDER BY run_at
 LIMIT 1;
