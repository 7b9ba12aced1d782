-- gpu_daemons: the daemons sharing this queue, each with its heartbeat.
-- A daemon whose heartbeat is older than its own timeout is taken for dead:
-- the others return its claims to 'pending' at once, without waiting for
-- their leases. A daemon that stops cleanly removes its row.
CREATE TABLE gpu_daemons (
    -- queue.daemon_id: the prefix of every claim it makes.
    daemon_id    text PRIMARY KEY CHECK (length(daemon_id) BETWEEN 1 AND 200),
    -- What it says about itself: host, pid, version (JSON).
    about        jsonb NOT NULL DEFAULT '{}',
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    -- Silent longer than this (seconds) means dead.
    timeout_s    double precision NOT NULL CHECK (timeout_s > 0)
);
