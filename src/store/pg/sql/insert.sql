-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Insert a job unless an identical one exists (idempotence on the unique
-- indexes); ON CONFLICT skips only uniqueness conflicts.
INSERT INTO gpu_jobs
       (id, payload_sha256, model_type, payload_path, payload_inline, created_at,
        status, priority, max_attempts, parent_id, fragment_index, total_fragments,
        follows, then_model, place, prefix_key, updated_at)
VALUES ($2, $3, $4, $5, $6, gpu_feeder_now($1), $7, $8, $9, $10, $11, $12, $13, $14, $15,
        $16, gpu_feeder_now($1))
ON CONFLICT DO NOTHING
RETURNING id
