-- End a parent that waits on its fragments; only one caller can.
UPDATE gpu_jobs
   SET status      = :status,
       result_path = :result_path,
       error       = :error,
       attempts    = attempts + 1,
       finished_at = :now,
       updated_at  = :now
 WHERE id = :id
   AND status = 'processing'
   AND total_fragments IS NOT NULL
   AND parent_id IS NULL;
