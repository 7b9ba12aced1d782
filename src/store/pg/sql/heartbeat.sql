-- $1: "now" (NULL: the server's clock; see gpu_feeder_now).
-- Register daemon $2 (about $3, timeout $4 s), or renew its heartbeat. A new
-- `about` (another pid: the daemon was restarted) starts it anew.
INSERT INTO gpu_daemons AS d (daemon_id, about, started_at, heartbeat_at, timeout_s)
VALUES ($2, $3, gpu_feeder_now($1), gpu_feeder_now($1), $4)
ON CONFLICT (daemon_id) DO UPDATE
   SET started_at   = CASE WHEN d.about = EXCLUDED.about THEN d.started_at
                           ELSE EXCLUDED.started_at END,
       about        = EXCLUDED.about,
       heartbeat_at = EXCLUDED.heartbeat_at,
       timeout_s    = EXCLUDED.timeout_s
