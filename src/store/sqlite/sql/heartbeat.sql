-- Register a daemon, or renew its heartbeat. A new `about` (another pid:
-- the daemon was restarted) starts it anew.
INSERT INTO gpu_daemons AS d (daemon_id, about, started_at, heartbeat_at, timeout_s)
VALUES (:daemon, :about, :now, :now, :timeout)
ON CONFLICT (daemon_id) DO UPDATE
   SET started_at   = CASE WHEN d.about = excluded.about THEN d.started_at
                           ELSE excluded.started_at END,
       about        = excluded.about,
       heartbeat_at = excluded.heartbeat_at,
       timeout_s    = excluded.timeout_s;
