-- Next stage: finished jobs that name a follow-up model, so that the ones
-- whose follow-up is still to be created are found quickly after a restart.
CREATE INDEX gpu_jobs_then ON gpu_jobs (finished_at)
    WHERE then_model IS NOT NULL AND status = 'done';
