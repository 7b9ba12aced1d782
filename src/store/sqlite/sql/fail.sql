-- Record a failed attempt; only the current claim may. A retryable failure
-- with attempts left goes back to 'pending' from :retry_at; anything else
-- ends 'failed'. (SET expressions read the row's old values.) The end of
-- settled.sql follows.
UPDATE gpu_jobs
   SET attempts    = attempts + 1,
       status      = CASE WHEN :retryable AND attempts + 1 < max_attempts
                          THEN 'pending' ELSE 'failed' END,
       run_at      = CASE WHEN :retryable AND attempts + 1 < max_attempts
                          THEN :retry_at ELSE run_at END,
       finished_at = CASE WHEN :retryable AND attempts + 1 < max_attempts
                          THEN NULL ELSE :now END,
       error       = :error,
