"""A real MCP client (the Python `mcp` SDK) submitting one job of each
input kind `submit_job` takes: `prompt`, `messages`, `image_path`,
`payload_path`, `text_file` (whole, and with `chunk`), with `priority` and
`then`; it reads each result back once the daemon has processed it and
checks that it answers that input. Exits non-zero on any failure.

    python3 tests/mcp_submit_kinds.py BIN CONFIG INPUTS_DIR

INPUTS_DIR holds page.png, payload.json (whose user message is "from a
payload file") and long.txt (1,200 words, three windows of the think
model's tokenizer).
"""

import asyncio
import json
import os
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def attr(obj, snake, camel):
    """The SDK names fields in snake_case (2.x) or camelCase (1.x)."""
    return getattr(obj, snake, None) if hasattr(obj, snake) else getattr(obj, camel, None)


def structured(result):
    assert not bool(attr(result, "is_error", "isError")), result.content[0].text
    value = attr(result, "structured_content", "structuredContent")
    if value is not None:
        return value
    return json.loads(result.content[0].text)


async def done(session, job_id):
    deadline = time.monotonic() + 90
    while True:
        job = structured(await session.call_tool("get_job", {"id": job_id}))
        if job["status"] == "done":
            return job
        assert job["status"] in ("pending", "processing"), job
        assert time.monotonic() < deadline, f"job not done in time: {job}"
        await asyncio.sleep(0.1)


async def main(binary: str, config: str, inputs: str) -> None:
    params = StdioServerParameters(command=binary, args=["--config", config, "mcp"])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

            async def submit(args):
                return structured(await session.call_tool("submit_job", args))

            prompt = await submit({"model": "think", "prompt": "a plain prompt", "priority": 5})
            messages = await submit({"model": "think", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "a chat of messages"},
            ]})
            image = await submit({"model": "vision", "image_path": os.path.join(inputs, "page.png"), "then": "think"})
            payload = await submit({"model": "think", "payload_path": os.path.join(inputs, "payload.json")})
            text = await submit({"model": "think", "text_file": os.path.join(inputs, "long.txt")})
            chunked = await submit({"model": "think", "text_file": os.path.join(inputs, "long.txt"), "chunk": True})
            assert chunked["fragments"] == 3, chunked
            assert not text.get("fragments"), text

            job = await done(session, prompt["id"])
            assert job["result"] == "echo: a plain prompt", job
            assert job["priority"] == 5, job
            job = await done(session, messages["id"])
            assert job["result"] == "echo: a chat of messages", job
            job = await done(session, image["id"])
            assert job["result"].startswith("ocr: image of about "), job
            assert job["then_model"] == "think", job
            job = await done(session, payload["id"])
            assert job["result"] == "echo: from a payload file", job
            job = await done(session, text["id"])
            assert job["result"].startswith("echo: w0 w1 w2"), job
            job = await done(session, chunked["id"])
            assert job["total_fragments"] == 3, job
            assert job["result"].startswith("echo: w0 w1 w2"), job

            # `then`: the vision job's answer became a think job's prompt.
            deadline = time.monotonic() + 90
            while True:
                listed = structured(await session.call_tool("list_jobs", {"model": "think", "limit": 100}))
                follow = [j for j in listed["jobs"] if j.get("follows") == image["id"]]
                if follow:
                    break
                assert time.monotonic() < deadline, listed
                await asyncio.sleep(0.1)
            assert len(follow) == 1, follow
            job = await done(session, follow[0]["id"])
            assert job["result"].startswith("echo: ocr: image of about "), job

            # Two inputs at once, or none, are refused with the reason.
            for bad in [{"model": "think"}, {"model": "think", "prompt": "x", "text_file": "y"}]:
                refused = await session.call_tool("submit_job", bad)
                assert bool(attr(refused, "is_error", "isError")), refused
                assert "give exactly one of" in refused.content[0].text, refused.content[0].text
    print("mcp submit kinds: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
