#!/usr/bin/env python3
"""The hand-written peer of the pipeline benchmark: the feeder a competent
engineer writes in an afternoon with asyncio, SQLite and aiohttp.

    peer_feeder.py submit --db jobs.db --jobs 40000 --tag w64
    peer_feeder.py run --db jobs.db --url http://127.0.0.1:PORT --results DIR \
        --window 64 --model sim --max-tokens 16

`submit` creates the table and inserts one-line prompt jobs. `run` claims
pending rows in batches (one UPDATE ... RETURNING per batch), keeps
`--window` chat-completion requests in flight over one keep-alive session,
writes each answer to its own result file (temporary file, then rename, so a
reader never sees half of one) and then marks its row done; the done marks
of all the requests that finished meanwhile share one transaction. It exits
when no job is pending or in flight.

It needs aiohttp (`pip install aiohttp`).
"""

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    claimed_at REAL,
    result_path TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id);
"""


def connect(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def submit(args):
    db = connect(args.db)
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO jobs (payload) VALUES (?)",
        (
            (json.dumps({"prompt": f"{args.tag} {i}"}),)
            for i in range(args.jobs)
        ),
    )
    db.execute("COMMIT")


def claim(db, n):
    return db.execute(
        "UPDATE jobs SET status = 'processing', claimed_at = ? WHERE id IN "
        "(SELECT id FROM jobs WHERE status = 'pending' ORDER BY id LIMIT ?) "
        "RETURNING id, payload",
        (time.time(), n),
    ).fetchall()


def write_result(results, job_id, body):
    shard = os.path.join(results, f"{job_id % 256:02x}")
    path = os.path.join(shard, f"{job_id}.json")
    tmp = os.path.join(shard, f".{job_id}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, path)
    return path


async def run(args):
    import aiohttp

    db = connect(args.db)
    for shard in range(256):
        os.makedirs(os.path.join(args.results, f"{shard:02x}"), exist_ok=True)
    url = args.url.rstrip("/") + "/v1/chat/completions"
    todo = asyncio.Queue()
    done = []
    done_ready = asyncio.Event()

    async def worker(session):
        while True:
            item = await todo.get()
            if item is None:
                return
            job_id, payload = item
            prompt = json.loads(payload)["prompt"]
            body = {
                "model": args.model,
                "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": prompt}],
            }
            async with session.post(url, json=body) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"job {job_id}: HTTP {r.status}: {raw[:200]!r}")
            usage = json.loads(raw).get("usage") or {}
            path = write_result(args.results, job_id, raw)
            done.append(
                (
                    path,
                    usage.get("prompt_tokens"),
                    usage.get("completion_tokens"),
                    time.time(),
                    job_id,
                )
            )
            done_ready.set()

    async def marker():
        # Every request that finished since the last commit, in one commit.
        while True:
            await done_ready.wait()
            done_ready.clear()
            batch = done[:]
            del done[:]
            db.execute("BEGIN")
            db.executemany(
                "UPDATE jobs SET status = 'done', result_path = ?, prompt_tokens = ?, "
                "completion_tokens = ?, finished_at = ? WHERE id = ?",
                batch,
            )
            db.execute("COMMIT")
            await asyncio.sleep(0)

    conn = aiohttp.TCPConnector(limit=args.window)
    async with aiohttp.ClientSession(connector=conn) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(args.window)]
        marks = asyncio.create_task(marker())
        while True:
            # Keep about one window claimed ahead of the workers.
            if todo.qsize() < args.window:
                rows = claim(db, args.window)
                if not rows:
                    break
                for row in rows:
                    todo.put_nowait(row)
            else:
                await asyncio.sleep(0.001)
        for _ in workers:
            todo.put_nowait(None)
        await asyncio.gather(*workers)
        while done:
            done_ready.set()
            await asyncio.sleep(0.001)
        marks.cancel()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--db", required=True)
    s.add_argument("--jobs", type=int, required=True)
    s.add_argument("--tag", default="peer")
    r = sub.add_parser("run")
    r.add_argument("--db", required=True)
    r.add_argument("--url", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--window", type=int, default=64)
    r.add_argument("--model", default="sim")
    r.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    if args.cmd == "submit":
        submit(args)
        return
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        sys.exit("the peer feeder needs aiohttp: pip install aiohttp")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
