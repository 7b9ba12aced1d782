-- Insert a job unless an identical one exists (idempotence on the unique
-- indexes: model and payload hash, parent and fragment index, follows).
-- ON CONFLICT skips only uniqueness conflicts; CHECK failures still raise.
INSERT INTO gpu_jobs
       (id, payload_sha256, model_type, payload_path, payload_inline, created_at,
        status, priority, max_attempts, parent_id, fragment_index, total_fragments,
        follows, then_model, place, prefix_key, updated_at)
VALUES (:id, :payload_sha256, :model_type, :payload_path, :payload_inline, :created_at,
        :status, :priority, :max_attempts, :parent_id, :fragment_index, :total_fragments,
        :follows, :then_model, :place, :prefix_key, :now)
ON CONFLICT DO NOTHING;
