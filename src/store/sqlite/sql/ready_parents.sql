-- Parents still waiting in 'processing' whose fragments have all finished:
-- fan-in left to do. A parent holds no lease; its fragments carry parent_id.
SELECT p.id
  FROM gpu_jobs AS p
 WHERE p.status = 'processing'
   AND p.parent_id IS NULL
   AND p.total_fragments IS NOT NULL
   AND p.lease_until IS NULL
   AND NOT EXISTS (
        SELECT 1 FROM gpu_jobs AS f
         WHERE f.parent_id = p.id
           AND f.status IN ('pending', 'processing'))
 LIMIT :limit;
