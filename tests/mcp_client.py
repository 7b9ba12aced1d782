"""A real, independent MCP client (the Python `mcp` SDK) driving
`gpu-feeder mcp` over stdio: initialize, list tools, submit a job, read its
result once the daemon has processed it, list jobs by status and model,
and get a tool error for bad arguments. Given a model no instance serves
(IDLE_MODEL), whose jobs stay pending, it also cancels such a job and
retries it. Exits non-zero on any failure.

    python3 tests/mcp_client.py BIN CONFIG [IDLE_MODEL]
"""

import asyncio
import json
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def attr(obj, snake, camel):
    """The SDK names fields in snake_case (2.x) or camelCase (1.x)."""
    return getattr(obj, snake, None) if hasattr(obj, snake) else getattr(obj, camel, None)


def structured(result):
    value = attr(result, "structured_content", "structuredContent")
    if value is not None:
        return value
    return json.loads(result.content[0].text)


def is_error(result):
    return bool(attr(result, "is_error", "isError"))


async def main(binary: str, config: str, idle: str | None) -> None:
    params = StdioServerParameters(command=binary, args=["--config", config, "mcp"])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            info = attr(init, "server_info", "serverInfo")
            assert info.name == "gpu-feeder", info

            tools = {t.name: t for t in (await session.list_tools()).tools}
            for name in ["submit_job", "get_job", "list_jobs", "cancel_job", "retry_job", "queue_stats", "instances", "gpu_status", "set_strategy"]:
                assert name in tools, f"missing tool {name}: {sorted(tools)}"
            schema = attr(tools["submit_job"], "input_schema", "inputSchema")
            assert "model" in schema["properties"] and schema["properties"]["model"].get("description"), schema

            submitted = await session.call_tool("submit_job", {"model": "think", "prompt": "hello from an MCP client"})
            assert not is_error(submitted), submitted
            job_id = structured(submitted)["id"]

            deadline = time.monotonic() + 60
            while True:
                job = structured(await session.call_tool("get_job", {"id": job_id}))
                if job["status"] == "done":
                    break
                assert job["status"] in ("pending", "processing"), job
                assert time.monotonic() < deadline, f"job not done in time: {job}"
                await asyncio.sleep(0.1)
            assert job["result"] == "echo: hello from an MCP client", job

            listed = structured(await session.call_tool("list_jobs", {"status": "done", "model": "think"}))
            assert job_id in [j["id"] for j in listed["jobs"]], listed
            assert all(j["status"] == "done" and j["model_type"] == "think" for j in listed["jobs"]), listed
            refused = await session.call_tool("cancel_job", {"id": job_id})
            assert is_error(refused) and "done" in refused.content[0].text, refused.content[0].text

            if idle:
                parked = structured(await session.call_tool("submit_job", {"model": idle, "prompt": "no server for this model"}))
                parked_id = parked["id"]
                cancelled = structured(await session.call_tool("cancel_job", {"id": parked_id[:12]}))
                assert cancelled["id"] == parked_id and cancelled["status"] == "cancelled", cancelled
                listed = structured(await session.call_tool("list_jobs", {"status": "cancelled"}))
                assert [j["id"] for j in listed["jobs"]] == [parked_id], listed
                retried = structured(await session.call_tool("retry_job", {"id": parked_id}))
                assert retried["status"] == "pending" and retried["attempts"] == 0, retried
                pending = structured(await session.call_tool("list_jobs", {"status": "pending", "model": idle}))
                assert [j["id"] for j in pending["jobs"]] == [parked_id], pending
                again = await session.call_tool("retry_job", {"id": parked_id})
                assert is_error(again), again

            bad = await session.call_tool("submit_job", {"model": "gpt", "prompt": "x"})
            assert is_error(bad), bad
            assert "unknown model type `gpt`" in bad.content[0].text, bad.content[0].text

            missing = await session.call_tool("get_job", {"id": "ffffffffffffffffffffffffffffffff"})
            assert is_error(missing) and "no job" in missing.content[0].text, missing

            stats = structured(await session.call_tool("queue_stats", {}))
            assert stats["jobs"]["think"]["done"] >= 1, stats

            live = structured(await session.call_tool("instances", {}))
            assert live["instances"][0]["state"] == "ready", live

            gpus = structured(await session.call_tool("gpu_status", {}))
            assert gpus["strategy"] == "static" and isinstance(gpus["gpus"], list), gpus
            assert gpus["gpus"] or gpus["gpu_unavailable"], gpus

            bad = await session.call_tool("set_strategy", {"pin": "everything"})
            assert is_error(bad) and "choose one of" in bad.content[0].text, bad.content[0].text
            # Only external instances here: the allocator does not run, and says so.
            none = await session.call_tool("set_strategy", {"pin": "think"})
            assert is_error(none) and "allocator does not run" in none.content[0].text, none.content[0].text
    print("mcp client: all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
