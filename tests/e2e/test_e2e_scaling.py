"""End to end: the ``openai`` SDK -> sidecar -> llama-server, sidecar -> Redis -> scaler -> KEDA.

Everything is real: llama.cpp's ``llama-server`` with Gemma 3 270M (``llama_server``), the
sidecar and the scaler (in this process, on loopback ports), a Redis, and the official
``openai`` SDK (its async client: the sidecar shares this event loop). Greedy decoding
and a few tokens per answer keep each test to seconds on 2 busy CPU cores.

What is asserted exactly: token counts (the sidecar's Prometheus counters, the stream's
entries, the scaler's rate x covered seconds) against llama-server's own ``usage``;
the streams clients see, with and without the sidecar. What is asserted with a stated
tolerance: rates against llama-server's ``timings``, and the scaler's freshness after
a load step (the model's own speed is never asserted). The figures go to stdout
(``pytest -s``) as ``E2E ...`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from sidecar.server import Sidecar
from tests.e2e.conftest import LlamaServer, Timings, sidecar_config
from tests.keda import KedaClient
from token_scaler.record import Record, decode, stream_key
from token_scaler.redis_conn import LocalRedis

pytestmark = pytest.mark.e2e

FLUSH_INTERVAL_S = 1.0  # the sidecar's default: one stream entry per second
CAPACITY = {"tokensPerSecondPerReplica": "100"}
# Every request of test 1 evaluates its whole prompt, so that the same request sent twice
# gets the same usage (prompt_tokens_details.cached_tokens included).
NO_CACHE = {"cache_prompt": False}
# A model name of its own for the load step of the freshness test: llama-server serves its
# one model whatever a request names, and the sidecar and the scaler count per named model.
STEP_MODEL = "gemma-3-270m-step"


def report(what: str, **figures: Any) -> None:
    print(f"E2E {what}: " + json.dumps(figures, default=str), flush=True)


# -- the stream, as a reader sees it ---------------------------------------------------


@dataclass
class Entry:
    entry_id: str
    id_ms: int
    record: Record


SUMS = ("sp", "sg", "ap", "ag", "rq")


def sums(entries: list[Entry], model: str | None = None) -> dict[str, int]:
    """Served/arrived prompt/generation tokens and requests ended, summed over entries."""
    out = dict.fromkeys(SUMS, 0)
    for entry in entries:
        for name, counts in entry.record.models.items():
            if model is None or name == model:
                for key, value in zip(SUMS, counts.as_list()[:5], strict=True):
                    out[key] += value
    return out


class StreamTail:
    """Follows a workload's stream with a blocking XREAD, as the scaler does, and keeps
    every entry it reads; rides out Redis outages (a restarted Redis holds new IDs only)."""

    def __init__(self, redis_url: str, workload: str) -> None:
        self.client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.key = stream_key(workload)
        self.entries: list[Entry] = []
        self.errors = 0
        self._last = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def _run(self) -> None:
        while True:
            try:
                reply: Any = await self.client.xread({self.key: self._last}, block=200, count=1000)
            except (redis.RedisError, OSError):
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            for _key, items in reply or []:
                for raw_id, fields in items:
                    entry_id = raw_id.decode()
                    record = decode(fields)
                    self.entries.append(Entry(entry_id, int(entry_id.split("-")[0]), record))
                    self._last = entry_id
                self._changed.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()

    async def wait_for(self, done: Callable[[], bool], within_s: float, what: str) -> None:
        deadline = time.monotonic() + within_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {within_s:g}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def settle(self, since: int, requests: int, within_s: float = 15.0) -> list[Entry]:
        """Entries from index ``since`` on, once they report ``requests`` ended requests:
        a request's final corrections travel in the same entry as its end. An entry a writer
        sent again (its ``seq`` seen before: a restarted Redis lost it) counts once, as
        readers count it."""

        def once() -> list[Entry]:
            return list({(e.record.sidecar, e.record.seq): e for e in self.entries[since:]}.values())

        await self.wait_for(
            lambda: sums(once())["rq"] >= requests,
            within_s,
            f"{requests} ended request(s) in the stream",
        )
        return self.entries[since:]


# -- the running system ------------------------------------------------------------------


@dataclass
class Stack:
    llama: LlamaServer
    sidecar: Sidecar
    scaler: ScalerServer
    keda: KedaClient
    tail: StreamTail
    http: aiohttp.ClientSession
    workload: str
    via: openai.AsyncOpenAI  # through the sidecar
    direct: openai.AsyncOpenAI  # straight to llama-server
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.workload.split("/")[0]

    async def poll(self, name: str, **metadata: str) -> float:
        """One KEDA poll of ScaledObject ``<namespace>/<name>`` reading this workload."""
        answer = await self.keda.poll(
            self.namespace, name, {**CAPACITY, "workload": self.workload, **metadata}
        )
        return answer.value

    async def debug(self, name: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.scaler.http_port}/debug/scalers/{self.namespace}/{name}"
        async with self.http.get(url) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def tokens_total(self) -> dict[tuple[str, str], float]:
        """The sidecar's ``tokenscaler_tokens_total`` by (type, model), scraped over HTTP."""
        async with self.http.get(f"http://127.0.0.1:{self.sidecar.admin_port}/metrics") as response:
            text = await response.text()
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "tokenscaler_tokens_total":
                    key = (sample.labels["type"], sample.labels["model"])
                    out[key] = out.get(key, 0.0) + sample.value
        return out

    async def llama_counters(self) -> dict[str, float]:
        async with self.http.get(f"{self.llama.base_url}/metrics") as response:
            text = await response.text()
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }


@contextlib.asynccontextmanager
async def running(
    llama: LlamaServer, redis_url: str, workload: str, *, stale_after_s: float = 10.0
) -> AsyncIterator[Stack]:
    closers: list[Callable[[], Awaitable[Any]]] = []
    try:
        sidecar = Sidecar(
            sidecar_config(
                llama,
                redis_url,
                workload,
                flush_interval_s=FLUSH_INTERVAL_S,
                sidecar_id=f"e2e-{uuid.uuid4().hex[:8]}",
            ),
            CollectorRegistry(),
        )
        await sidecar.start()
        closers.append(sidecar.stop)
        scaler = ScalerServer(
            ScalerConfig(
                grpc_port=0,
                http_port=0,
                host="127.0.0.1",
                redis_url=redis_url,
                stale_after_s=stale_after_s,
                debug_open=True,
            ),
            CollectorRegistry(),
        )
        await scaler.start()
        closers.append(scaler.stop)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}")
        closers.append(channel.close)
        tail = StreamTail(redis_url, workload)
        await tail.start()
        closers.append(tail.close)
        http = aiohttp.ClientSession()
        closers.append(http.close)
        via = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{sidecar.port}/v1",
            api_key="unused",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )
        closers.append(via.close)
        # No keep-alive straight to llama-server: it closes the connection after each streamed
        # response (see upstream_closed), and the next request must not go out on it.
        direct = openai.AsyncOpenAI(
            base_url=llama.openai_base_url,
            api_key="unused",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
            default_headers={"Connection": "close"},
        )
        closers.append(direct.close)
        keda = KedaClient(channel, f"127.0.0.1:{scaler.grpc_port}")
        yield Stack(llama, sidecar, scaler, keda, tail, http, workload, via, direct, closers)
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()


@pytest.fixture
async def stack(llama_server: LlamaServer, redis_url: str, workload: str) -> AsyncIterator[Stack]:
    async with running(llama_server, redis_url, workload) as s:
        yield s


# -- requests ------------------------------------------------------------------------------

MESSAGES: list[Any] = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are"


async def create(client: openai.AsyncOpenAI, api: str, model: str, **kwargs: Any) -> Any:
    """One greedy request: a completion, or for streams the list of chunks."""
    request: dict[str, Any] = {"model": model, "temperature": 0, **kwargs}
    if api == "chat":
        response: Any = await client.chat.completions.create(messages=MESSAGES, **request)
    else:
        response = await client.completions.create(prompt=PROMPT, **request)
    if kwargs.get("stream"):
        return [chunk async for chunk in response]
    return response


def _drop_volatile(value: Any) -> Any:
    # What differs between two runs of the same request: its id, its creation second and
    # llama-server's measured timings.
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in ("id", "created", "timings")}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def visible(response: Any) -> Any:
    """What a client sees of a response or stream, parsed by the SDK, minus per-run values."""
    if isinstance(response, list):
        return [_drop_volatile(chunk.model_dump(mode="json")) for chunk in response]
    return _drop_volatile(response.model_dump(mode="json"))


@dataclass
class Done:
    model: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    started: float  # wall clock (this host's, which is Redis' clock too)
    ended: float


async def stream_completion(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Done:
    """A streamed completion of exactly ``max_tokens`` tokens, with usage in its last chunk."""
    started = time.time()
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    last: Any = None
    async for chunk in stream:
        last = chunk
    ended = time.time()
    assert last is not None and last.usage is not None, "no usage chunk"
    assert last.usage.completion_tokens == max_tokens
    return Done(
        model,
        last.usage.prompt_tokens,
        last.usage.completion_tokens,
        Timings.from_response(last),
        started,
        ended,
    )


REQUEST_TIMEOUT_S = 60.0  # one request's bound, so that a stuck request fails a test instead of hanging it


def upstream_closed(exc: openai.APIStatusError) -> bool:
    """The sidecar's 502 for a request that went out on a pooled connection llama-server had
    just closed. llama-server closes its connection after every streamed response while
    announcing keep-alive; a request sent on it before the close is seen fails with nothing
    served. Clients straight to llama-server hit the same race (see the final report)."""
    return exc.status_code == 502 and "Server disconnected" in str(exc.message)


@dataclass
class Load:
    done: list[Done] = field(default_factory=list)
    # Requests answered 502 by upstream_closed(): the sidecar counts each as an ended request
    # with no token.
    dropped: list[float] = field(default_factory=list)

    def sums(self) -> dict[str, int]:
        """What the stream must hold for this load: llama-server's usage, summed."""
        prompt = sum(d.prompt_tokens for d in self.done)
        generation = sum(d.completion_tokens for d in self.done)
        return {
            "sp": prompt,
            "sg": generation,
            "ap": prompt,
            "ag": generation,
            "rq": len(self.done) + len(self.dropped),
        }


async def workers(
    count: int, until: float | Callable[[], float], request: Callable[[int], Awaitable[Done]], load: Load
) -> None:
    """``count`` clients, each sending one request after the other until ``until`` (monotonic;
    a callable: read before each request, so the caller can move it)."""
    counter = itertools.count()
    deadline = until if callable(until) else lambda: until

    async def worker() -> None:
        while time.monotonic() < deadline():
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    load.done.append(await request(next(counter)))
            except openai.APIStatusError as exc:
                if not upstream_closed(exc):
                    raise
                load.dropped.append(time.time())

    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(worker())


def story(i: int) -> str:
    return f"Story number {i}. Once upon a time, in a small town by the sea,"


async def next_second(after_ms: int) -> None:
    """Sleep until this host's clock (Redis' too) is past the whole second holding ``after_ms``."""
    await asyncio.sleep(max(0.0, after_ms // 1000 + 1 - time.time()) + 0.25)


# -- 1. exact counts, unchanged streams -------------------------------------------------------

MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "stream": {"stream": True},
    "stream+usage": {"stream": True, "stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("api", ["chat", "completion"])
async def test_counts_equal_usage_and_streams_are_unchanged(stack: Stack, api: str) -> None:
    model = stack.llama.model
    common: dict[str, Any] = {"max_tokens": 8, "extra_body": NO_CACHE}
    # llama-server's own usage for this request (greedy: every run of it generates the same).
    baseline = await create(stack.direct, api, model, **common)
    usage = baseline.usage
    assert usage is not None and usage.completion_tokens > 0
    stack.llama.record(baseline, f"e2e {api} direct")
    counted: dict[str, dict[str, int]] = {}

    for mode, extra in MODES.items():
        direct = baseline if mode == "plain" else await create(stack.direct, api, model, **common, **extra)
        since = len(stack.tail.entries)
        metrics_before = await stack.tokens_total()
        llama_before = await stack.llama_counters()

        proxied = await create(stack.via, api, model, **common, **extra)

        # 1a. What the client sees is what it would have seen without the sidecar.
        assert visible(proxied) == visible(direct), f"{api} {mode}: the sidecar changed the response"
        if mode == "plain":
            assert proxied.usage == usage
        elif mode == "stream+usage" or api == "completion":
            # llama-server's /v1/completions puts usage in its last chunk (the one with the
            # finish_reason) whether asked or not; chat sends OpenAI's separate usage chunk.
            assert [c.usage for c in proxied if c.usage is not None] == [usage]
            assert proxied[-1].usage == usage
            assert (proxied[-1].choices == []) == (api == "chat")
            if mode == "stream+usage":
                stack.llama.record(proxied[-1], f"e2e {api} via sidecar")
        else:
            # The sidecar asked for usage on the client's behalf and took it out again.
            assert all(chunk.usage is None for chunk in proxied), "the sidecar's usage request leaked"

        # 1b. The stream entries of this request add up to llama-server's usage exactly.
        entries = await stack.tail.settle(since, 1)
        got = sums(entries)
        want = {
            "sp": usage.prompt_tokens,
            "sg": usage.completion_tokens,
            "ap": usage.prompt_tokens,
            "ag": usage.completion_tokens,
            "rq": 1,
        }
        assert got == want, f"{api} {mode}: stream {got} != usage {want}"
        counted[mode] = got

        # 1c. So do the sidecar's Prometheus counters...
        after = await stack.tokens_total()
        delta = {
            t: after.get((t, model), 0) - metrics_before.get((t, model), 0) for t in ("prompt", "generation")
        }
        assert delta == {"prompt": usage.prompt_tokens, "generation": usage.completion_tokens}

        # 1d. ... and llama-server's own counters for this very request (its prompt is never
        # cached here, so every prompt token is one it evaluated). They are updated as the
        # slot is released, which may come a moment after the last byte.
        llama_delta: dict[str, float] = {}
        for _ in range(50):
            llama_after = await stack.llama_counters()
            llama_delta = {
                k: llama_after[k] - llama_before[k]
                for k in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total")
            }
            if llama_delta["llamacpp:tokens_predicted_total"] >= usage.completion_tokens:
                break
            await asyncio.sleep(0.05)
        assert llama_delta == {
            "llamacpp:prompt_tokens_total": usage.prompt_tokens,
            "llamacpp:tokens_predicted_total": usage.completion_tokens,
        }

    report(
        f"counts {api}",
        usage={"prompt": usage.prompt_tokens, "completion": usage.completion_tokens},
        stream_sums=counted,
    )


# -- 2. the scaler's generation rate against llama-server's ------------------------------------

LOAD_S = 14.0  # how long the batch keeps sending
RATE_WINDOW_S = 10  # the shortest stable window a ScaledObject may ask for


def decoded_in(done: list[Done], start_s: float, stop_s: float) -> float:
    """Tokens llama-server generated in ``[start_s, stop_s)``, by its own timings: each
    answer's ``predicted_n`` tokens spread evenly over the ``predicted_ms`` before its end."""
    total = 0.0
    for d in done:
        span = d.timings.predicted_ms / 1000
        begin = d.ended - span
        if span <= 0:
            total += d.timings.predicted_n if start_s <= d.ended < stop_s else 0
            continue
        overlap = max(0.0, min(d.ended, stop_s) - max(begin, start_s))
        total += d.timings.predicted_n * overlap / span
    return total


async def test_scaler_generation_rate_matches_llama_server(stack: Stack) -> None:
    model = stack.llama.model
    # Two ScaledObjects reading the workload: one whose window holds the whole run (for the
    # totals) and one with a 10 s window, sampled while the load runs (for the rate).
    whole = {"windowSeconds": "120", "panicWindowSeconds": "6"}
    short = {"windowSeconds": str(RATE_WINDOW_S), "panicWindowSeconds": "2"}
    assert await stack.poll("whole", **whole) == 0.0
    await stack.poll("short", **short)

    load = Load()
    samples: list[dict[str, Any]] = []
    until = time.monotonic() + LOAD_S

    async def sample() -> None:
        while time.monotonic() < until:
            await asyncio.sleep(1.0)
            body = await stack.debug("short")
            samples.append({"at": time.time(), **body["evaluation"]})

    # As many clients as llama-server has slots (--parallel 2): a steady, saturating load.
    clients = workers(2, until, lambda i: stream_completion(stack.via, model, story(i), 24), load)
    await asyncio.gather(clients, sample())
    done = load.done
    load_end = max(d.ended for d in done)

    # Everything has reached the stream (the last request's final counts included), and the
    # second that holds it is complete on the scaler's clock.
    await stack.tail.settle(0, len(done) + len(load.dropped))
    await next_second(max(e.record.ts_ms for e in stack.tail.entries))
    for _ in range(100):  # the scaler reads the stream on its own schedule (a blocking XREAD)
        view = await stack.debug("whole")
        if view["stream"]["entriesRead"] >= len(stack.tail.entries):
            break
        await asyncio.sleep(0.05)
    assert view["stream"]["entriesRead"] >= len(stack.tail.entries)
    evaluation = view["evaluation"]
    covered = evaluation["windowCoverageSeconds"]
    stable = evaluation["stable"]
    assert 0 < covered < 120, "the 120 s window must hold the whole run"

    # Exact: rate x covered seconds is the token count over the window, which holds the whole
    # run. The only slack is the debug view's rounding of each rate to 3 decimals (at most
    # 0.0005 tokens/s x covered seconds < 0.1 token): round() recovers the integer.
    want = load.sums()
    scaler_generation = round(stable["servedGenerationTokensPerSecond"] * covered)
    scaler_prompt = round(stable["servedPromptTokensPerSecond"] * covered)
    assert scaler_generation == want["sg"], (scaler_generation, want)
    assert scaler_prompt == want["sp"], (scaler_prompt, want)
    assert round(stable["arrivedGenerationTokensPerSecond"] * covered) == want["ag"]
    assert round(stable["requestsPerSecond"] * covered) == want["rq"]
    # llama-server's timings count the same tokens: predicted_n is every generated token
    # (its rate, predicted_per_second, leaves the first out; the count does not).
    predicted = sum(d.timings.predicted_n for d in done)
    assert predicted == want["sg"] == scaler_generation
    assert sum(d.timings.prompt_n + d.timings.cache_n for d in done) == want["sp"]

    # The rate, window by window: each 10 s window the scaler reported while the load ran,
    # against what llama-server's timings say it generated over the same span of time. The
    # scaler's window [s-10, s) holds the entries it places in those seconds, and each entry
    # holds what streamed through the sidecar in (ts - dt, ts]: the span the window really
    # covers is from the earliest such start to the latest ts, up to a flush interval off
    # [s-10, s). Compared over that span, the counts agree within 15 %: what is left is
    # llama-server's side assuming each answer's tokens evenly spread over its predicted_ms
    # (its first token comes with the prompt; a busy CPU stalls some steps), at the two
    # edges of the span. A window whose last entry the scaler had not read yet when asked
    # (its count differs from the stream's) is reported and not compared.
    entries = stack.tail.entries
    compared: list[dict[str, Any]] = []
    skipped: list[int] = []
    for snapshot in samples:
        second = snapshot["second"]
        if snapshot["windowCoverageSeconds"] < RATE_WINDOW_S or second > load_end:
            continue
        placed = [
            e for e in entries if second - RATE_WINDOW_S <= min(e.record.ts_ms, e.id_ms) // 1000 < second
        ]
        scaler_rate = snapshot["stable"]["servedGenerationTokensPerSecond"]
        scaler_tokens = round(scaler_rate * RATE_WINDOW_S)
        if scaler_tokens != sums(placed)["sg"]:
            skipped.append(second)
            continue
        span_start = min(e.record.ts_ms - e.record.interval_ms for e in placed) / 1000
        span_stop = max(e.record.ts_ms for e in placed) / 1000
        llama_tokens = decoded_in(done, span_start, span_stop)
        compared.append(
            {
                "second": second,
                "scaler_tps": scaler_rate,
                "llama_tps_same_seconds": round(
                    decoded_in(done, second - RATE_WINDOW_S, second) / RATE_WINDOW_S, 2
                ),
                "scaler_tokens": scaler_tokens,
                "llama_tokens_same_span": round(llama_tokens, 1),
                "span_s": round(span_stop - span_start, 3),
            }
        )
    per_request = [d.timings.predicted_per_second for d in done]
    report(
        "rate",
        requests=len(done),
        dropped_upstream_closed=len(load.dropped),
        generated=want["sg"],
        prompt=want["sp"],
        scaler_total_generation=scaler_generation,
        timings_predicted_n=predicted,
        covered_s=covered,
        windows=compared,
        windows_skipped=skipped,
        llama_per_request_tps_mean=round(sum(per_request) / len(per_request), 1),
        aggregate_tps=round(want["sg"] / (load_end - min(d.started for d in done)), 1),
    )
    assert compared, f"no complete {RATE_WINDOW_S}s window compared: {samples}, skipped {skipped}"
    for window in compared:
        assert window["scaler_tokens"] == pytest.approx(window["llama_tokens_same_span"], rel=0.15), window


# -- 3. a load step reaches the scaler's answer within its freshness bound -------------------

# The documented bound: a count is in the scaler's answer at most this long after the flush
# that carried it (the flush's second must be complete, then the entry is read at once).
FRESHNESS_BOUND_S = 2.0
POLL_S = 0.1  # how often this test polls GetMetrics (KEDA polls far less often)


async def test_load_step_reaches_the_scaler_within_its_freshness_bound(stack: Stack) -> None:
    model = stack.llama.model
    windows = {"windowSeconds": "10", "panicWindowSeconds": "2"}
    # "all" counts every model; "step" only the step's requests (named STEP_MODEL), so its
    # answer is 0 until the scaler has read the flush that carried the step, then > 0.
    await stack.poll("all", **windows)
    assert await stack.poll("step", model=STEP_MODEL, **windows) == 0.0
    redis_offset_s = (stack.sidecar.flusher.offset_ms or 0) / 1000

    load = Load()
    light_until = time.monotonic() + 30.0  # stopped below, after the step
    light = asyncio.create_task(
        workers(1, light_until, lambda i: stream_completion(stack.via, model, story(i), 4), load)
    )
    try:
        # Steady light load until the scaler's answer reflects it.
        baseline: list[float] = []
        deadline = time.monotonic() + 20
        while len(baseline) < 20 or not load.done:
            assert time.monotonic() < deadline, "the light load never reached the scaler"
            value = await stack.poll("all", **windows)
            assert await stack.poll("step", model=STEP_MODEL, **windows) == 0.0
            if value > 0:
                baseline.append(value)
            await asyncio.sleep(POLL_S)

        before_step = (await stack.debug("all"))["evaluation"]
        # The step: two more clients with answers 8x longer, beside the light one (3 clients
        # for 2 slots, so one waits: arrivals run ahead of what is served).
        step_at = time.time()
        step_until = time.monotonic() + 30.0
        step = asyncio.create_task(
            workers(2, step_until, lambda i: stream_completion(stack.via, STEP_MODEL, story(i), 32), load)
        )
        try:
            polls: list[tuple[float, float, float]] = []  # (Redis time, step value, all value)
            deadline = time.monotonic() + 20
            while not polls or polls[-1][1] <= 0:
                assert time.monotonic() < deadline, f"the step never reached the scaler: {polls[-5:]}"
                await asyncio.sleep(POLL_S)
                step_value = await stack.poll("step", model=STEP_MODEL, **windows)
                polls.append((time.time() + redis_offset_s, step_value, await stack.poll("all", **windows)))
            at_step = (await stack.debug("all"))["evaluation"]
        finally:
            step.cancel()
            light.cancel()
            await asyncio.gather(step, light, return_exceptions=True)
    finally:
        light.cancel()

    # The flush that carried the step: the sidecar's first entry with the step's model (it
    # holds the step's arrival estimates). Its ts is when the sidecar cut it, on Redis' clock.
    carrying = next(e for e in stack.tail.entries if STEP_MODEL in e.record.models)
    flush_s = carrying.record.ts_ms / 1000
    seen_s, step_value, all_value = polls[-1]
    previous_poll_s = polls[-2][0] if len(polls) > 1 else step_at + redis_offset_s
    delay = seen_s - flush_s
    poll_gap = seen_s - previous_poll_s
    bound = FRESHNESS_BOUND_S + FLUSH_INTERVAL_S + max(POLL_S, poll_gap)
    report(
        "freshness",
        step_to_flush_s=round(flush_s - (step_at + redis_offset_s), 3),
        flush_stored_after_cut_s=round((carrying.id_ms - carrying.record.ts_ms) / 1000, 3),
        flush_to_getmetrics_s=round(delay, 3),
        poll_gap_s=round(poll_gap, 3),
        asserted_bound_s=round(bound, 3),
        all_models_before=[round(v, 1) for v in baseline[-3:]],
        all_models_at_step_seen=round(all_value, 1),
        all_models_debug={
            when: {k: e[k] for k in ("value", "rule", "windowCoverageSeconds", "panicActive")}
            | {"stable_demand": e["stable"]["demand"], "panic_demand": e["panic"]["demand"]}
            for when, e in (("before", before_step), ("seen", at_step))
        },
        step_value=round(step_value, 1),
    )
    assert flush_s >= step_at + redis_offset_s - 0.05, "an entry of the step's model before the step"
    assert delay <= bound, (
        f"the step took {delay:.2f}s after its flush to reach GetMetrics (bound {bound:.2f}s)"
    )
    # And not before its flush: the scaler never shows what Redis does not hold.
    assert delay > 0


# -- 4. a Redis outage loses no count and counts nothing twice --------------------------------


OUTAGE_S = 5.0


async def test_redis_outage_loses_no_count(
    llama_server: LlamaServer, own_redis: LocalRedis, workload: str
) -> None:
    restarted: list[LocalRedis] = []
    try:
        await _outage(llama_server, own_redis, workload, restarted)
    finally:
        for server in restarted:
            server.stop()


async def _outage(
    llama: LlamaServer, own_redis: LocalRedis, workload: str, restarted: list[LocalRedis]
) -> None:
    model = llama.model
    whole = {"windowSeconds": "120", "panicWindowSeconds": "6"}
    load = Load()
    async with running(llama, own_redis.url, workload, stale_after_s=2.0) as stack:
        await stack.poll("whole", **whole)
        # Two clients, one request after the other, for the whole run: Redis dies and comes
        # back under them, with requests in flight; they stop 3 s after it is back.
        starts: list[float] = []
        end = [time.monotonic() + 3600.0]

        async def request(i: int) -> Done:
            starts.append(time.time())
            return await stream_completion(stack.via, model, story(i), 12)

        clients = asyncio.create_task(workers(2, lambda: end[0], request, load))
        try:
            await asyncio.sleep(3.0)
            # Kill Redis right after an entry has been read (the next flush is then about a
            # second away), so that no entry is both stored and lost with the server.
            seen = len(stack.tail.entries)
            await stack.tail.wait_for(lambda: len(stack.tail.entries) > seen, 5, "a flush")
            own_redis.process.kill()
            own_redis.process.wait()
            killed_at = time.time()

            # The outage: requests keep being served; the sidecar buffers its records; the
            # scaler, with no fresh data, answers UNAVAILABLE once its staleness bound passes.
            # It lasts OUTAGE_S, and on a slow host until a request has started in it.
            unavailable: list[str] = []
            while time.time() < killed_at + OUTAGE_S or not any(t > killed_at for t in starts):
                assert time.time() < killed_at + OUTAGE_S + 60, "no request started in the outage"
                try:
                    await stack.poll("whole", **whole)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        unavailable.append(f"{time.time() - killed_at:.1f}s")
                await asyncio.sleep(0.5)
            buffered = stack.sidecar.flusher.buffered
            assert buffered >= OUTAGE_S - 2, (
                f"only {buffered} records buffered through a {OUTAGE_S:g}s outage"
            )

            # Read from the old server: what the tail had parsed by the kill, and any reply
            # already in its socket then.
            seqs_before = [e.record.seq for e in stack.tail.entries]
            restarted.append(LocalRedis.start(port=own_redis.port))
            back_at = time.time()
            end[0] = time.monotonic() + 3.0
            await clients
        finally:
            clients.cancel()
            await asyncio.gather(clients, return_exceptions=True)

        await stack.tail.settle(0, len(load.done) + len(load.dropped), within_s=20)
        await stack.tail.wait_for(lambda: stack.sidecar.flusher.buffered == 0, 10, "an empty buffer")
        await next_second(max(e.record.ts_ms for e in stack.tail.entries))
        view = await stack.debug("whole")
        entries = list(stack.tail.entries)

    # Every request was answered in full, those sent while Redis was down too.
    done = load.done
    phases = {
        "before": [d for d in done if d.started < killed_at],
        "outage": [d for d in done if killed_at <= d.started < back_at],
        "after": [d for d in done if d.started >= back_at],
    }
    in_flight_at_kill = sum(1 for d in done if d.started < killed_at < d.ended)
    assert phases["outage"] and all(d.completion_tokens == 12 for d in done)
    # The stream, as read across the outage (a restarted Redis starts empty; what it held
    # before was read before the kill): every seq, none missing, and once each the counts add
    # up to llama-server's usage exactly. An append whose reply the kill cut off (stored, but
    # the sidecar could not know) is sent again and stored again by the restarted Redis,
    # which forgot the seq keys: only those may come twice, and the scaler skips them.
    seqs = [e.record.seq for e in entries]
    last_before = max(seqs_before)
    twice = sorted(seq for seq in set(seqs) if seqs.count(seq) > 1)
    assert all(seq <= last_before for seq in twice) and seqs.count(last_before) <= 2, seqs
    assert sorted(set(seqs)) == list(range(min(seqs), max(seqs) + 1)), "an entry is missing"
    once = list({e.record.seq: e for e in entries}.values())
    want = load.sums()
    assert sums(once) == want
    # What the restarted Redis holds: the records buffered through the outage and those
    # after, none of those it held before but one stored again.
    sync = redis.Redis.from_url(own_redis.url)
    try:
        held = [decode(fields).seq for _id, fields in sync.xrange(stream_key(workload))]
    finally:
        sync.close()
    assert held and min(held) >= last_before - len(twice) + 1
    assert view["stream"]["duplicateEntries"] <= len(twice)  # those the scaler had read, skipped
    assert sorted(s for s in held if s > last_before)[0] == last_before + 1
    # The scaler read it all: its 120 s window holds the whole run, exactly.
    assert view["dataFresh"] and view["redisError"] is None
    evaluation = view["evaluation"]
    covered = evaluation["windowCoverageSeconds"]
    stable = evaluation["stable"]
    report(
        "outage",
        requests={name: len(ds) for name, ds in phases.items()},
        in_flight_at_kill=in_flight_at_kill,
        dropped_upstream_closed=len(load.dropped),
        outage_s=round(back_at - killed_at, 2),
        buffered_records=buffered,
        stream_entries=len(entries),
        entries_held_by_restarted_redis=len(held),
        stored_twice=twice,
        scaler_skipped_duplicates=view["stream"]["duplicateEntries"],
        usage=want,
        stream=sums(entries),
        scaler_generation=stable["servedGenerationTokensPerSecond"] * covered,
        scaler_unavailable_at=unavailable[:3],
    )
    assert round(stable["servedGenerationTokensPerSecond"] * covered) == want["sg"]
    assert round(stable["servedPromptTokensPerSecond"] * covered) == want["sp"]
    assert round(stable["requestsPerSecond"] * covered) == want["rq"]
    assert unavailable, "the scaler never answered UNAVAILABLE while Redis was down"
