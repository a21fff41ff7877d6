"""``token-scaler profile`` against a fake OpenAI-compatible server on a loopback port.

The fake runs at most ``SLOTS`` requests at once (the rest wait, as in llama.cpp's
``--parallel``), prefills at ``PREFILL`` tokens/s, and produces a token every
``STEP + PER_SEQ x running`` seconds, so the profiler has a known answer to find.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
from collections.abc import Iterator

import pytest
import yaml
from aiohttp import web

from scaler.metadata import parse
from tuning import profile as cli
from tuning import simulate as sim_cli
from tuning.replica import load_profile

SLOTS = 2
PREFILL = 4000.0
STEP = 0.004
PER_SEQ = 0.002


class FakeServer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.running = 0
        self.requests = 0
        self.url = ""

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        # as vLLM exports its cache configuration (no /props: not llama.cpp)
        return web.Response(
            text='vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="512"} 1.0\n'
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        if self.fail:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        prompt = len(body["messages"][0]["content"].split()) + 3  # + the chat template's tokens
        max_tokens = int(body["max_tokens"])
        async with self.slots:
            self.running += 1
            try:
                await asyncio.sleep(prompt / PREFILL)
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                for k in range(max_tokens):
                    if k:
                        await asyncio.sleep(STEP + PER_SEQ * self.running)
                    chunk = {"choices": [{"index": 0, "delta": {"content": "tok "}}]}
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": max_tokens,
                    "total_tokens": prompt + max_tokens,
                }
                await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            finally:
                self.running -= 1

    def serve(self) -> Iterator[FakeServer]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(app, shutdown_timeout=1)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self.slots = asyncio.Semaphore(SLOTS)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert started.wait(10)
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    yield from FakeServer().serve()


@pytest.fixture
def failing() -> Iterator[FakeServer]:
    yield from FakeServer(fail=True).serve()


def test_profile_finds_the_slots_and_writes_a_profile_simulate_reads(fake, tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = cli.main(
        [
            "--url", fake.url,
            "--concurrency", "1,2,4",
            "--step-seconds", "1.5",
            "--prompt-tokens", "200",
            "--output-tokens", "12",
            "--ttft-p95", "0.5",
            "--itl-p95", "0.05",
            "--json", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    doc = json.loads(out.read_text())
    assert doc["model"] == "fake-model"  # found through GET /v1/models
    steps = doc["steps"]
    assert [s["concurrency"] for s in steps] == [1, 2, 4]
    assert all(s["requests"] > 0 and s["errors"] == 0 for s in steps)
    assert steps[0]["mean_prompt"] == pytest.approx(203) and steps[0]["mean_output"] == pytest.approx(12)
    # two slots: throughput doubles from 1 to 2 and stops there; requests then wait
    assert doc["replica"]["max_concurrency"] == 2
    assert steps[2]["wait_p50"] > steps[1]["wait_p50"]
    # inter-token latency of the fake is STEP + PER_SEQ x running
    assert doc["replica"]["step_base_s"] == pytest.approx(STEP + PER_SEQ, abs=0.004)
    rec = doc["recommendation"]
    best = max((s for s in steps if s["meets"]), key=lambda s: s["weighted_tps"])
    assert rec["tokensPerSecondPerReplica"] == pytest.approx(best["weighted_tps"], rel=1e-3)
    # the printed trigger: the type the examples use, metadata the scaler accepts as it stands
    after = text.split("ScaledObject trigger metadata:\n", 1)[1].splitlines()
    snippet = "\n".join(itertools.takewhile(lambda line: line.startswith("  "), after))
    trigger = yaml.safe_load(snippet)["triggers"][0]
    assert trigger["type"] == "external-push"
    settings = parse(trigger["metadata"], "llm", "vllm")
    assert settings.tokens_per_second_per_replica == pytest.approx(round(best["weighted_tps"]))

    assert doc["replica"]["kv_cache_tokens"] == 512 * 16  # vLLM's blocks x block size
    profile = load_profile(out)
    assert profile.kv_cache_tokens == 8192
    assert (
        profile.max_concurrency == 2
        and profile.tokens_per_second_per_replica == rec["tokensPerSecondPerReplica"]
    )
    code = sim_cli.main(["--replica-profile", str(out), "--policies", "token", "--quiet"])
    assert code == 0
    assert f"replica: {out} (fake-model" in capsys.readouterr().out


def test_open_loop_steps_send_at_the_rate_whatever_the_server_does(fake, tmp_path, capsys):
    """Open loop: at 2 requests/s the two slots keep up; at 40/s (twice what two slots of
    about 0.1 s per request serve) requests keep arriving and wait, so the time to first
    token grows, where a closed loop would have sent fewer."""
    out = tmp_path / "open.json"
    code = cli.main(
        [
            "--url", fake.url,
            "--rates", "2,40",
            "--step-seconds", "2",
            "--prompt-tokens", "200",
            "--output-tokens", "12",
            "--ttft-p95", "5",
            "--itl-p95", "1",
            "--json", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    steps = json.loads(out.read_text())["steps"]
    assert [s["offered_rps"] for s in steps] == [2, 40]
    # Poisson arrivals over 2 s: about 4 and 80 requests (all answered, none refused)
    assert 1 <= steps[0]["requests"] <= 12 and 50 <= steps[1]["requests"] <= 120
    assert steps[1]["ttft_p50"] > 2 * steps[0]["ttft_p50"]
    assert steps[1]["concurrency"] > steps[0]["concurrency"]  # mean in flight grew
    assert "offered req/s" in text and "in flight" in text


def test_profile_plot(fake, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "profile.png"
    code = cli.main(
        ["--url", fake.url + "/v1", "--model", "fake-model", "--concurrency", "1,2", "--step-seconds", "0.5",
         "--prompt-tokens", "50", "--output-tokens", "5", "--plot", str(png), "--quiet", "--itl-p95", "1"]
    )  # fmt: skip
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_draws_sizes_from_the_shipped_trace(fake, tmp_path):
    out = tmp_path / "p.json"
    code = cli.main(
        ["--url", fake.url, "--concurrency", "2", "--step-seconds", "1", "--max-prompt-tokens", "64",
         "--max-output-tokens", "4", "--json", str(out), "--quiet", "--itl-p95", "1", "--ttft-p95", "5"]
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    assert "Splitwise" in doc["request_sizes"]
    assert doc["steps"][0]["mean_prompt"] <= 64 + 3


def test_profile_reports_a_failing_server(failing, capsys):
    code = cli.main(
        ["--url", failing.url, "--model", "m", "--concurrency", "1", "--step-seconds", "0.3", "--quiet"]
    )
    assert code == 1
    assert "HTTP 500" in capsys.readouterr().err
    assert failing.requests <= 5  # a failing server is not hammered
