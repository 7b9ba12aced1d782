-- The job's server went down while the job was in flight; only the current
-- claim may record it. Back to 'pending' with the crash counted (attempts
-- unchanged), or 'failed' as a poison job at the :limit-th crash. The end
-- of settled.sql follows.
UPDATE gpu_jobs
   SET crashes     = crashes + 1,
       status      = CASE WHEN crashes + 1 >= :limit THEN 'failed' ELSE 'pending' END,
       finished_at = CASE WHEN crashes + 1 >= :limit THEN :now ELSE NULL END,
       error       = CASE WHEN crashes + 1 >= :limit THEN :error ELSE error END,
