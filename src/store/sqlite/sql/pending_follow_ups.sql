-- Jobs that are done and name a follow-up model, but whose follow-up job has
-- not been created yet (the daemon stopped in between, say).
SELECT j.id
  FROM gpu_jobs AS j
 WHERE j.status = 'done'
   AND j.then_model IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM gpu_jobs AS f WHERE f.follows = j.id)
 LIMIT :limit;
