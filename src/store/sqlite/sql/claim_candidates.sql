-- What a grouped claim chooses from: the oldest :lookahead due pending jobs
-- of one model, and every due pending job of a warm key (:warm, a JSON
-- array of the keys just sent to the claiming instance). `+run_at` keeps
-- the planner on gpu_jobs_claim and gpu_jobs_prefix (see claim.sql). A row
-- in both halves comes twice (UNION ALL): the caller drops the second, more
-- cheaply than a UNION's temporary index of every row.
SELECT rowid AS seq, priority, created_at, prefix_key
  FROM (SELECT rowid, priority, created_at, prefix_key
          FROM gpu_jobs
         WHERE status = 'pending'
           AND model_type = :model
           AND +run_at <= :now
         ORDER BY priority DESC, created_at, rowid
         LIMIT :lookahead)
UNION ALL
SELECT rowid, priority, created_at, prefix_key
  FROM gpu_jobs
 WHERE status = 'pending'
   AND model_type = :model
   AND +run_at <= :now
   AND prefix_key IN (SELECT value FROM json_each(:warm));
