-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- End parent $2 that waits on its fragments, as $3 with result $4 or error
-- $5; only one caller can.
UPDATE gpu_jobs
   SET status = $3, result_path = $4, error = $5, attempts = attempts + 1,
       finished_at = gpu_feeder_now($1), updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND status = 'processing' AND total_fragments IS NOT NULL
   AND parent_id IS NULL
