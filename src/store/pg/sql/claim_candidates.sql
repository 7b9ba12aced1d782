SELECT seq, priority, created_at, prefix_key, gpu_feeder_now($1) AS now
  FROM ((SELECT seq, priority, created_at, prefix_key FROM gpu_jobs
          WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
          ORDER BY priority DESC, created_at, seq
          LIMIT $3)
        UNION
        (SELECT seq, priority, created_at, prefix_key FROM gpu_jobs
          WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
            AND prefix_key = ANY($4))) AS c
