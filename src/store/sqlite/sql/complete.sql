-- Record a successful attempt; only the current claim may.
UPDATE gpu_jobs
   SET status            = 'done',
       result_path       = :result_path,
       prompt_tokens     = :prompt_tokens,
       completion_tokens = :completion_tokens,
       latency_ms        = :latency_ms,
       attempts          = attempts + 1,
       error             = NULL,
       claim_id          = NULL,
       lease_until       = NULL,
       finished_at       = :now,
       updated_at        = :now
 WHERE id = :id
   AND claim_id = :claim_id
   AND status = 'processing';
