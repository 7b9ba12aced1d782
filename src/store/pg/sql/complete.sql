-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Record a successful attempt of job $2; only the current claim ($3) may.
UPDATE gpu_jobs
   SET status = 'done', result_path = $4, prompt_tokens = $5, completion_tokens = $6,
       latency_ms = $7, attempts = attempts + 1, error = NULL, claim_id = NULL,
       lease_until = NULL, finished_at = gpu_feeder_now($1), updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'
