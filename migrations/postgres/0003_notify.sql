-- Wake-ups without polling the table: every row that becomes claimable
-- (inserted, returned to 'pending', or given a new run_at) notifies channel
-- `gpu_jobs` with its model, whoever wrote it. PostgreSQL folds the
-- notifications of one transaction that carry the same payload into one,
-- so a batch of a thousand rows wakes each daemon once per model.
CREATE FUNCTION gpu_jobs_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify('gpu_jobs', NEW.model_type);
    RETURN NULL;
END
$$;

CREATE TRIGGER gpu_jobs_notify_insert
    AFTER INSERT ON gpu_jobs
    FOR EACH ROW WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION gpu_jobs_notify();

CREATE TRIGGER gpu_jobs_notify_update
    AFTER UPDATE OF status, run_at ON gpu_jobs
    FOR EACH ROW WHEN (NEW.status = 'pending'
                       AND (OLD.status <> 'pending' OR OLD.run_at IS DISTINCT FROM NEW.run_at))
    EXECUTE FUNCTION gpu_jobs_notify();
