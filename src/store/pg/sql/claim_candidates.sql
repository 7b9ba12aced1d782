-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- What a grouped claim chooses from: the oldest $3 due pending jobs of model
-- $2, and every due pending job of a warm key ($4, the keys just sent).
SELECT seq, priority, created_at, prefix_key, gpu_feeder_now($1) AS now
  FROM ((SELECT seq, priority, created_at, prefix_key FROM gpu_jobs
          WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
          ORDER BY priority DESC, created_at, seq
          LIMIT $3)
        UNION
        (SELECT seq, priority, created_at, prefix_key FROM gpu_jobs
          WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
            AND prefix_key = ANY($4))) AS c
