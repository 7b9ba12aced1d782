-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Daemons silent past their heartbeat timeout leave the registry, and their
-- claims (and their dispatchers') go back to 'pending': each with how long it
-- was silent and how many claims it had.
WITH dead AS (
    DELETE FROM gpu_daemons
     WHERE heartbeat_at < gpu_feeder_now($1) - timeout_s
    RETURNING daemon_id, gpu_feeder_now($1) - heartbeat_at AS silent),
taken AS (
    UPDATE gpu_jobs AS j
       SET status = 'pending', claim_id = NULL, lease_until = NULL,
           updated_at = gpu_feeder_now($1)
      FROM dead
     WHERE j.status = 'processing' AND j.lease_until IS NOT NULL
       AND (j.claimed_by = dead.daemon_id
            OR left(j.claimed_by, length(dead.daemon_id) + 1) = dead.daemon_id || '/')
    RETURNING dead.daemon_id)
SELECT dead.daemon_id, dead.silent, (SELECT count(*) FROM taken WHERE taken.daemon_id = dead.daemon_id)
  FROM dead
