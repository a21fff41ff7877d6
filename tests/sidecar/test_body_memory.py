"""The sidecar in a process limited to the example manifest's 512 MiB survives the largest bodies
it takes, several at once, and refuses larger ones before reading them into memory."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bench.body_memory import body_of, peak_mib, wait_port
from token_scaler.redis_conn import free_port

LIMIT_BYTES = 512 << 20  # manifests/examples/vllm/deployment.yaml: the sidecar's memory limit


@pytest.fixture
async def any_body_upstream() -> AsyncIterator[int]:
    answer = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(answer)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (LIMIT_BYTES, LIMIT_BYTES))


def start_sidecar(upstream: int, redis_url: str, workload: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [sys.executable, "-m", "token_scaler.cli", "sidecar", "--workload", workload]
    argv += ["--upstream", f"http://127.0.0.1:{upstream}", "--redis-url", redis_url, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--admin-port", str(free_port()), "--shutdown-delay", "0"]
    proc = subprocess.Popen(argv, preexec_fn=_limited)
    wait_port(port, proc)
    return proc, port


async def test_large_bodies_in_a_memory_limited_process(
    any_body_upstream: int, redis_url: str, workload: str
) -> None:
    proc, port = await asyncio.to_thread(start_sidecar, any_body_upstream, redis_url, workload)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as session:

            async def post(body: bytes) -> int:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    return r.status

            # Two bodies just under the default limit, of small objects (the most memory per
            # byte once parsed), at once; then one of the 61 MB that used to get it killed.
            near = body_of(15.5)
            assert list(await asyncio.gather(post(near), post(near))) == [200, 200]
            assert await post(body_of(61)) == 413
            assert await post(json.dumps({"model": "m", "messages": []}).encode()) == 200
        assert proc.poll() is None
        assert peak_mib(proc.pid) < LIMIT_BYTES / (1 << 20)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
