"""Drives gpu-feeder's OpenAI API with the official `openai` SDK.

    openai_sdk_client.py all BASE_URL KEY        every endpoint, end to end
    openai_sdk_client.py start BASE_URL KEY N    a batch of N requests, left
                                                 running once some are done
    openai_sdk_client.py finish BASE_URL KEY ID N
                                                 waits for batch ID, checks its files
    openai_sdk_client.py big BASE_URL KEY N      times a batch of N requests
    openai_sdk_client.py cancel_unqueued BASE_URL KEY
                                                 a batch cancelled before its lines
                                                 were queued (the worker busy queueing
                                                 a big one): every line an error
    openai_sdk_client.py chat BASE_URL KEY       models, chat completions (plain,
                                                 streamed), their errors
    openai_sdk_client.py stream BASE_URL KEY DB  a streamed answer relayed as the
                                                 server writes it (its job's status
                                                 read from the queue file DB at the
                                                 first words), then one whose client
                                                 goes away mid-stream
    openai_sdk_client.py broken BASE_URL KEY     a stream whose server dies after the
                                                 first words: prints `first words` on a
                                                 line of its own, then the report
    openai_sdk_client.py too_big BASE_URL KEY    a file over 200 MB is refused
    openai_sdk_client.py expired BASE_URL KEY ID N
                                                 waits for batch ID to expire, checks
                                                 its files and the list's purpose filter
    openai_sdk_client.py overtake BASE_URL KEY N a chat completion while a batch
                                                 of N runs, against one on an idle server

Prints one JSON object with what it saw; exits non-zero on a failed check.
"""

import io
import json
import sqlite3
import sys
import time
import urllib.error
import urllib.request

import openai

ENDED = {"completed", "failed", "expired", "cancelled"}


def client(base, key):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def line(custom_id, text, url="/v1/chat/completions", method="POST", model="sim"):
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": method,
            "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8},
        }
    )


def upload(c, lines, name="in.jsonl"):
    data = ("\n".join(lines) + "\n").encode()
    return c.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def create(c, file_id):
    return c.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"test": "sdk"},
    )


def wait(c, batch_id, until, limit=120):
    start = time.monotonic()
    while True:
        b = c.batches.retrieve(batch_id)
        if until(b):
            return b
        assert time.monotonic() - start < limit, f"batch {batch_id} stuck: {b}"
        time.sleep(0.1)


def file_lines(c, file_id):
    if file_id is None:
        return []
    return [json.loads(l) for l in c.files.content(file_id).text.splitlines() if l.strip()]


def check_results(c, b, ids):
    """Every custom_id exactly once across the output and error files."""
    out = file_lines(c, b.output_file_id)
    err = file_lines(c, b.error_file_id)
    seen = [l["custom_id"] for l in out + err]
    assert sorted(seen) == sorted(ids), f"custom_ids: {len(seen)} seen, {len(ids)} sent"
    for l in out:
        assert l["response"]["status_code"] == 200, l
        assert l["response"]["body"]["choices"][0]["message"]["content"] is not None, l
        assert l["id"].startswith("batch_req_"), l
    return out, err


def raw_status(base, path, headers, data=None):
    req = urllib.request.Request(base + path, headers=headers, data=data)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def everything(base, key):
    c = client(base, key)
    report = {}

    # Keys: a wrong one and none are refused as the SDK expects.
    try:
        client(base, "wrong-key").files.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    status, body = raw_status(base, "/v1/files", {})
    assert status == 401 and set(body["error"]) >= {"message", "type", "param", "code"}, body

    # A batch with two requests the server refuses (HTTP 400).
    ids = [f"req-{i}" for i in range(30)]
    texts = ["POISON please" if i in (3, 17) else f"question {i}" for i in range(30)]
    f = upload(c, [line(i, t) for i, t in zip(ids, texts)])
    assert f.object == "file" and f.purpose == "batch" and f.bytes > 0, f
    assert c.files.retrieve(f.id).filename == "in.jsonl"
    b = create(c, f.id)
    assert b.status == "validating" and b.metadata == {"test": "sdk"}, b
    try:
        c.files.delete(f.id)
        report["delete_while_running"] = "allowed"
    except openai.ConflictError:
        report["delete_while_running"] = 409
    b = wait(c, b.id, lambda b: b.status in ENDED)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (30, 28, 2), b
    out, err = check_results(c, b, ids)
    assert sorted(e["custom_id"] for e in err) == ["req-17", "req-3"], err
    for e in err:
        assert e["response"]["status_code"] == 400, e
    report["completed"] = {"output": len(out), "errors": len(err)}

    # Cancelling: cancelled, with whatever was done, every line accounted for.
    ids2 = [f"c-{i}" for i in range(40)]
    f2 = upload(c, [line(i, f"cancel me {i}") for i in ids2])
    b2 = create(c, f2.id)
    b2 = c.batches.cancel(b2.id)
    assert b2.status in ("cancelling", "cancelled"), b2
    b2 = wait(c, b2.id, lambda b: b.status in ENDED)
    assert b2.status == "cancelled", b2
    out2, err2 = check_results(c, b2, ids2)
    report["cancelled"] = {"output": len(out2), "errors": len(err2)}
    try:
        c.batches.cancel(b.id)
        raise AssertionError("a completed batch was cancelled")
    except openai.ConflictError:
        pass
    assert c.files.delete(f2.id).deleted

    # A malformed file: failed before any line ran, each bad line named.
    bad = [
        line("ok-1", "fine"),
        "this is not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "sim", "messages": [{"role": "user", "content": "x"}]}}),
        line("ok-1", "duplicate"),
        line("wrong-url", "x", url="/v1/embeddings"),
        line("wrong-method", "x", method="GET"),
    ]
    f3 = upload(c, bad)
    b3 = wait(c, create(c, f3.id).id, lambda b: b.status in ENDED)
    assert b3.status == "failed", b3
    got = [(e.line, e.code) for e in b3.errors.data]
    assert got == [
        (2, "invalid_json_line"),
        (3, "missing_custom_id"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "invalid_method"),
    ], got
    assert b3.output_file_id is None and b3.request_counts.total == 0, b3

    # More batches than one page: the SDK's auto-pagination sees each once.
    for i in range(3):
        create(c, upload(c, [line(f"p-{i}", "page")]).id)
    listed = [x.id for x in c.batches.list(limit=2)]
    assert len(listed) == len(set(listed)) == 6, listed
    assert listed[-1] == b.id, listed
    files = [x.id for x in c.files.list(limit=3)]
    assert len(files) == len(set(files)) and f.id in files, files

    # Errors the SDK reads.
    try:
        c.batches.retrieve("batch_nope")
        raise AssertionError("an unknown batch was found")
    except openai.NotFoundError:
        pass
    try:
        c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
        raise AssertionError("a fine-tune file was taken")
    except openai.BadRequestError as e:
        assert e.param == "purpose", e.body
    try:
        c.files.create(file=("big.jsonl", io.BytesIO(b"{}\n" * 50_001)), purpose="batch")
        raise AssertionError("a file of 50,001 lines was taken")
    except openai.BadRequestError as e:
        assert "50000 lines" in e.message, e.message
    report["listed"] = len(listed)
    report["batch_id"] = b.id
    return report


def start(base, key, n):
    c = client(base, key)
    ids = [f"k-{i}" for i in range(n)]
    b = create(c, upload(c, [line(i, f"durable {i}") for i in ids]).id)
    b = wait(c, b.id, lambda b: b.request_counts.completed >= 3 or b.status in ENDED)
    return {"batch_id": b.id, "status": b.status, "completed": b.request_counts.completed}


def finish(base, key, batch_id, n):
    c = client(base, key)
    b = wait(c, batch_id, lambda b: b.status in ENDED)
    assert b.status == "completed", b
    out, err = check_results(c, b, [f"k-{i}" for i in range(n)])
    return {"status": b.status, "output": len(out), "errors": len(err)}


def big(base, key, n):
    c = client(base, key)
    # An interactive question's time on the idle server, then while the
    # batch runs.
    idle = sorted(ask(c, f"idle question {i}")[1] for i in range(5))
    ids = [f"b-{i}" for i in range(n)]
    t0 = time.monotonic()
    f = upload(c, [line(i, f"short question number {i}") for i in ids])
    t1 = time.monotonic()
    b = create(c, f.id)
    b = wait(c, b.id, lambda b: b.request_counts.completed >= 1 or b.status in ENDED)
    busy = sorted(ask(c, f"urgent question {i}")[1] for i in range(5))
    during = c.batches.retrieve(b.id)
    b = wait(c, b.id, lambda b: b.status in ENDED, limit=1800)
    t2 = time.monotonic()
    assert b.status == "completed", b
    out, err = check_results(c, b, ids)
    t3 = time.monotonic()
    return {
        "requests": n,
        "upload_s": round(t1 - t0, 2),
        "create_to_completed_s": round(t2 - t1, 2),
        "download_s": round(t3 - t2, 2),
        # The batch's own timestamps (whole seconds).
        "validate_and_queue_s": b.in_progress_at - b.created_at,
        "run_s": b.finalizing_at - b.in_progress_at,
        "finalize_s": b.completed_at - b.finalizing_at,
        "output": len(out),
        "errors": len(err),
        "chat_idle_median_s": round(idle[2], 3),
        "chat_during_batch_median_s": round(busy[2], 3),
        "chat_during_batch_max_s": round(busy[-1], 3),
        "batch_status_when_answered": during.status,
        "batch_completed_when_answered": during.request_counts.completed,
    }


def ask(c, text, **kw):
    t0 = time.monotonic()
    r = c.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": text}], max_tokens=8, **kw
    )
    return r, time.monotonic() - t0


def chat(base, key):
    c = client(base, key)
    report = {}
    models = [m.id for m in c.models.list()]
    assert models == ["sim"], models
    assert c.models.retrieve("sim").owned_by == "gpu-feeder"
    r, _ = ask(c, "hello there")
    assert r.object == "chat.completion", r
    content = r.choices[0].message.content
    assert content, r
    assert r.usage.completion_tokens > 0, r
    report["content"] = content
    # Streamed: the same kind of answer, reassembled from chunks.
    stream = c.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, n = [], None, None, 0
    for chunk in stream:
        n += 1
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert "".join(parts), parts
    assert finish in ("stop", "length"), finish
    assert usage and usage.completion_tokens > 0, usage
    report["streamed"] = "".join(parts)
    report["chunks"] = n
    # A model nobody serves: 404 model_not_found, as OpenAI answers.
    try:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown model was taken")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.body
        assert "sim" in e.message, e.message
    # A refusal of the model server comes back with its status and words.
    try:
        ask(c, "POISON")
        raise AssertionError("the server's refusal was hidden")
    except openai.APIStatusError as e:
        report["refused_status"] = e.status_code
    # Not JSON, and no model: 400.
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    status, body = raw_status(base, "/v1/chat/completions", headers, b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"], (status, body)
    status, body = raw_status(base, "/v1/chat/completions", headers, b'{"messages": []}')
    assert status == 400 and body["error"]["param"] == "model", (status, body)
    # No key: 401.
    try:
        client(base, "sk-wrong").chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}]
        )
        raise AssertionError("a wrong key was taken")
    except openai.AuthenticationError:
        pass
    return report



def job_status(db, job):
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT status FROM gpu_jobs WHERE id = ?", (job,)).fetchone()[0]
    finally:
        conn.close()


def stream(base, key, db):
    c = client(base, key)
    report = {}
    words = " ".join(f"w{i}" for i in range(12))
    ask = dict(
        model="sim",
        messages=[{"role": "user", "content": words}],
        max_tokens=40,
        stream=True,
    )
    # Relayed: the first words come while the job is still being sent, and
    # no usage chunk comes when none was asked for.
    t0 = time.monotonic()
    first_words_s = None
    with c.chat.completions.with_streaming_response.create(**ask) as resp:
        job = resp.headers["x-gpu-feeder-job"]
        parts, status_at_first, finish, usage_chunks = [], None, None, 0
        for chunk in resp.parse():
            assert chunk.object == "chat.completion.chunk", chunk
            if chunk.usage:
                usage_chunks += 1
            for ch in chunk.choices:
                if ch.delta.content:
                    if status_at_first is None:
                        first_words_s = time.monotonic() - t0
                        status_at_first = job_status(db, bytes.fromhex(job))
                    parts.append(ch.delta.content)
                finish = ch.finish_reason or finish
    report.update(
        first_words_s=round(first_words_s, 3),
        whole_answer_s=round(time.monotonic() - t0, 3),
        job=job,
        text="".join(parts),
        content_chunks=len(parts),
        status_at_first_words=status_at_first,
        finish_reason=finish,
        usage_chunks=usage_chunks,
    )
    # A client that goes away after the first words.
    with c.chat.completions.with_streaming_response.create(**ask) as resp:
        report["gone_job"] = resp.headers["x-gpu-feeder-job"]
        for chunk in resp.parse():
            if any(ch.delta.content for ch in chunk.choices):
                break
        resp.close()
    return report


def cancel_unqueued(base, key):
    c = client(base, key)
    big_ids = [f"big-{i}" for i in range(20000)]
    big = create(c, upload(c, [line(i, f"bulk {i}") for i in big_ids], name="big.jsonl").id)
    # The worker validates and queues the big batch line by line; the small
    # one, created and cancelled meanwhile, never gets its turn.
    ids = [f"small-{i}" for i in range(5)]
    small = create(c, upload(c, [line(i, f"small {i}") for i in ids]).id)
    small = c.batches.cancel(small.id)
    big_status = c.batches.retrieve(big.id).status
    small = wait(c, small.id, lambda b: b.status in ENDED)
    assert small.status == "cancelled", small
    out, err = check_results(c, small, ids)
    codes = sorted({e["error"]["code"] for e in err})
    c.batches.cancel(big.id)
    big = wait(c, big.id, lambda b: b.status in ENDED, limit=600)
    assert big.status == "cancelled", big
    check_results(c, big, big_ids)
    return {
        "big_status_when_small_cancelled": big_status,
        "small_output": len(out),
        "small_errors": len(err),
        "small_error_codes": codes,
        "small_counts": [small.request_counts.total, small.request_counts.failed],
    }


def broken(base, key):
    c = client(base, key)
    stream = c.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "a long answer, cut short"}],
        max_tokens=40,
        stream=True,
    )
    parts, said, error = [], False, None
    try:
        for chunk in stream:
            for ch in chunk.choices:
                if ch.delta.content:
                    parts.append(ch.delta.content)
            if parts and not said:
                print("first words", flush=True)
                said = True
    except openai.APIError as e:
        error = e.message
    return {"text": "".join(parts), "error": error}


def overtake(base, key, n):
    c = client(base, key)
    idle = sorted(ask(c, f"idle question {i}")[1] for i in range(5))
    ids = [f"o-{i}" for i in range(n)]
    b = create(c, upload(c, [line(i, f"bulk line {i}") for i in ids]).id)
    b = wait(c, b.id, lambda b: b.request_counts.completed >= 1 or b.status in ENDED)
    assert b.status == "in_progress", b
    busy = []
    for i in range(5):
        _, s = ask(c, f"urgent question {i}")
        busy.append(s)
    busy.sort()
    # Streamed, too: its first words while the batch still runs.
    t0 = time.monotonic()
    first_words_s, streamed = None, []
    for chunk in c.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "urgent streamed question"}],
        max_tokens=8,
        stream=True,
    ):
        for ch in chunk.choices:
            if ch.delta.content:
                if first_words_s is None:
                    first_words_s = time.monotonic() - t0
                streamed.append(ch.delta.content)
    assert "".join(streamed).startswith("echo: urgent streamed"), streamed
    during = c.batches.retrieve(b.id)
    b = wait(c, b.id, lambda b: b.status in ENDED, limit=600)
    assert b.status == "completed", b
    check_results(c, b, ids)
    return {
        "streamed_first_words_s": round(first_words_s, 3),
        "idle_median_s": round(idle[2], 3),
        "busy_median_s": round(busy[2], 3),
        "busy_max_s": round(busy[-1], 3),
        "batch_completed_when_answered": during.request_counts.completed,
        "batch_status_when_answered": during.status,
        "batch_total": n,
    }


def expired(base, key, batch_id, n):
    c = client(base, key)
    b = wait(c, batch_id, lambda b: b.status in ENDED)
    assert b.status == "expired", b
    assert b.expired_at, b
    out, err = check_results(c, b, [f"k-{i}" for i in range(n)])
    codes = {l["error"]["code"] for l in err}
    assert codes == {"batch_expired"}, codes
    # The list keeps to a purpose when asked.
    inputs = [f.purpose for f in c.files.list(purpose="batch")]
    outputs = [f.purpose for f in c.files.list(purpose="batch_output")]
    assert inputs and set(inputs) == {"batch"}, inputs
    assert outputs and set(outputs) == {"batch_output"}, outputs
    return {"status": b.status, "output": len(out), "errors": len(err)}


def too_big(base, key):
    c = client(base, key)
    line = b'{"custom_id": "x", "pad": "' + b"p" * (10 * 1024 * 1024) + b'"}\n'
    data = line * 20 + b"{}\n" * 1000
    assert len(data) > 200 * 1024 * 1024
    try:
        c.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
        raise AssertionError("a file over 200 MB was taken")
    except openai.BadRequestError as e:
        assert e.param == "file" and "200 MB" in e.message, e.body
    return {"listed": len(list(c.files.list())), "bytes": len(data)}


if __name__ == "__main__":
    mode, base, key = sys.argv[1:4]
    if mode == "all":
        result = everything(base, key)
    elif mode == "big":
        result = big(base, key, int(sys.argv[4]))
    elif mode == "too_big":
        result = too_big(base, key)
    elif mode == "expired":
        result = expired(base, key, sys.argv[4], int(sys.argv[5]))
    elif mode == "chat":
        result = chat(base, key)
    elif mode == "stream":
        result = stream(base, key, sys.argv[4])
    elif mode == "broken":
        result = broken(base, key)
    elif mode == "cancel_unqueued":
        result = cancel_unqueued(base, key)
    elif mode == "overtake":
        result = overtake(base, key, int(sys.argv[4]))
    elif mode == "start":
        result = start(base, key, int(sys.argv[4]))
    else:
        result = finish(base, key, sys.argv[4], int(sys.argv[5]))
    print(json.dumps(result))
