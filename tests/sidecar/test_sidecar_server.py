"""The process: configuration errors, admin endpoints, and SIGTERM with a stream in flight."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import SidecarConfig, make_sidecar_id
from sidecar.loop_lag import LoopLag
from tests.sidecar.conftest import StartSidecar, read_records, totals
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler import cli
from token_scaler.errors import ConfigError
from token_scaler.redis_conn import free_port


def test_config_from_env_and_flags() -> None:
    env = {"TOKEN_SCALER_WORKLOAD": "ns/llm", "REDIS_URL": "redis://r:6379/1", "TOKEN_SCALER_PORT": "81"}
    config = SidecarConfig.load(["--admin-port", "9999"], env)
    assert (config.workload, config.redis_url, config.port, config.admin_port) == (
        "ns/llm",
        "redis://r:6379/1",
        81,
        9999,
    )
    assert config.tenant_header == "X-Tenant-ID" and config.upstream == "http://127.0.0.1:8000"
    assert config.buffer_records >= 600 and config.flush_interval_s == 1.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "TOKEN_SCALER_WORKLOAD"),
        ({"TOKEN_SCALER_WORKLOAD": "Not/Valid_"}, "TOKEN_SCALER_WORKLOAD"),
        ({"TOKEN_SCALER_WORKLOAD": "a/b", "TOKEN_SCALER_PORT": "x"}, "TOKEN_SCALER_PORT"),
        ({"TOKEN_SCALER_WORKLOAD": "a/b", "TOKEN_SCALER_MAX_MODELS": "64"}, "TOKEN_SCALER_MAX_MODELS"),
        (
            {"TOKEN_SCALER_WORKLOAD": "a/b", "TOKEN_SCALER_TOKENIZER": "/nonexistent"},
            "TOKEN_SCALER_TOKENIZER",
        ),
        ({"TOKEN_SCALER_WORKLOAD": "a/b", "TOKEN_SCALER_SIDECAR_ID": "a b"}, "TOKEN_SCALER_SIDECAR_ID"),
        ({"TOKEN_SCALER_WORKLOAD": "a/b", "TOKEN_SCALER_LOG_LEVEL": "LOUD"}, "TOKEN_SCALER_LOG_LEVEL"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        SidecarConfig.load([], env)


def test_cli_reports_bad_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TOKEN_SCALER_WORKLOAD", raising=False)
    assert cli.main(["sidecar"]) == 2
    assert "TOKEN_SCALER_WORKLOAD" in capsys.readouterr().err


def test_sidecar_id() -> None:
    assert make_sidecar_id({"POD_NAME": "llm-7f9c/x é"}).startswith("llm-7f9c-x--")
    assert make_sidecar_id({"POD_NAME": "p"}) != make_sidecar_id({"POD_NAME": "p"})


async def test_admin_endpoints(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()
    base = f"http://127.0.0.1:{sidecar.admin_port}"
    async with aiohttp.ClientSession() as session:
        assert (await session.get(f"{base}/healthz")).status == 200
        ready = await session.get(f"{base}/readyz")
        assert ready.status == 200 and (await ready.json())["sidecar"] == "test-0"
        metrics = await (await session.get(f"{base}/metrics")).text()
        assert "tokenscaler_flush_buffered_records" in metrics
        assert "tokenscaler_event_loop_lag_seconds_bucket" in metrics
        sidecar.ready = False
        assert (await session.get(f"{base}/readyz")).status == 503


async def test_sigterm_drains_the_stream_then_flushes(
    upstream: FakeUpstream, redis_url: str, workload: str, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "TOKEN_SCALER_WORKLOAD": workload,
        "TOKEN_SCALER_FLUSH_INTERVAL": "3600",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "token_scaler.cli",
        "sidecar",
        "--upstream",
        f"http://127.0.0.1:{upstream.port}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--admin-port",
        str(admin),
        "--shutdown-delay",
        "0.5",
        "--drain-timeout",
        "20",
        env=env,
        stderr=open(tmp_path / "stderr", "wb"),  # noqa: SIM115, ASYNC230
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                try:
                    if (await session.get(f"http://127.0.0.1:{admin}/readyz")).status == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.02)
            body = {"model": "m", "messages": [{"content": "hi"}], "max_tokens": 40, "stream": True}
            response = await session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers={"X-Fake-Delay": "0.02"}
            )
            first = await response.content.readline()
            assert first.startswith(b"data: ")
            process.send_signal(signal.SIGTERM)
            for _ in range(500):  # the signal lands asynchronously
                if (await session.get(f"http://127.0.0.1:{admin}/readyz")).status == 503:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("readiness never turned 503")
            rest = await response.content.read()
        assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b'"content":"t') == 40
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    got = totals(read_records(redis_url, workload))
    assert (got["sg"], got["ag"], got["rq"]) == (40, 40, 1)
    assert got["sp"] == upstream.reported.prompt


def test_event_loop_choice() -> None:
    from token_scaler.httpserve import loop_factory

    assert loop_factory("asyncio") is None
    pytest.importorskip("uvloop")
    factory = loop_factory("auto")
    assert factory is not None and loop_factory("uvloop") is factory


async def test_loop_lag_sees_a_blocked_loop() -> None:
    registry = CollectorRegistry()
    probe = LoopLag(registry)
    task = asyncio.create_task(probe.run())

    def late(bound: float) -> float:
        """Samples later than ``bound`` seconds."""
        total = registry.get_sample_value("tokenscaler_event_loop_lag_seconds_count")
        within = registry.get_sample_value("tokenscaler_event_loop_lag_seconds_bucket", {"le": str(bound)})
        assert total is not None and within is not None, f"no bucket {bound}"
        return total - within

    try:
        await asyncio.sleep(0.2)  # the probe is armed and sampling
        before = late(0.025)
        # A callback that holds the loop 60 ms: the probe's timer, due within 10 ms, runs at
        # least 50 ms late, whatever the machine's speed.
        asyncio.get_running_loop().call_soon(time.sleep, 0.06)
        await asyncio.sleep(0.2)
        assert late(0.025) >= before + 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
