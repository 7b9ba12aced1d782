-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Record a failed attempt of job $2; only the current claim ($3) may. A
-- retryable ($4) failure with attempts left goes back to 'pending' $5
-- seconds on; anything else ends 'failed' with error $6. The end of
-- settled.sql follows.
UPDATE gpu_jobs
   SET attempts    = attempts + 1,
       status      = CASE WHEN $4 AND attempts + 1 < max_attempts THEN 'pending' ELSE 'failed' END,
       run_at      = CASE WHEN $4 AND attempts + 1 < max_attempts
                          THEN gpu_feeder_now($1) + $5 ELSE run_at END,
       finished_at = CASE WHEN $4 AND attempts + 1 < max_attempts
                          THEN NULL ELSE gpu_feeder_now($1) END,
       error       = $6,
