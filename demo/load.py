"""The demo's load: a request trace replayed against the sidecars, with a burst in the middle."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from tuning.trace import Trace

MAX_PROMPT_WORDS = 8192


@dataclass(frozen=True)
class Planned:
    at_s: float
    prompt: int
    generate: int
    stream: bool
    tenant: str
    burst: bool


def plan(
    trace: Trace,
    *,
    duration_s: float,
    rps: float,
    burst: tuple[float, float],
    burst_factor: int,
    burst_generation_factor: float,
    seed: int = 0,
) -> list[Planned]:
    """Poisson arrivals at ``rps`` over ``duration_s``, each with the next request's sizes from
    ``trace`` (in its order, from the start again when it runs out); inside the ``burst``
    fraction of the run each arrival comes ``burst_factor`` times with answers
    ``burst_generation_factor`` x longer.

    Steady arrivals rather than the trace's own: its bursts and quiet spells would hide what
    the burst changes. The same seed gives the same plan."""
    rng = random.Random(seed)
    if len(trace) == 0:
        raise ValueError("the trace has no requests")
    tenants = ["acme", "globex", "initech", "umbrella"]
    out: list[Planned] = []
    t = rng.expovariate(rps)
    i = 0
    while t < duration_s:
        prompt, generated = int(trace.prompt[i % len(trace)]), int(trace.generated[i % len(trace)])
        i += 1
        in_burst = burst[0] * duration_s <= t < burst[1] * duration_s
        copies = burst_factor if in_burst else 1
        gen = generated * (burst_generation_factor if in_burst else 1)
        for copy in range(copies):
            out.append(
                Planned(
                    at_s=t + (rng.uniform(0, 1.0 / rps) if copy else 0.0),
                    prompt=max(1, min(prompt, MAX_PROMPT_WORDS)),
                    generate=max(1, int(gen)),
                    stream=rng.random() < 0.5,
                    tenant=rng.choice(tenants),
                    burst=in_burst,
                )
            )
        t += rng.expovariate(rps)
    out.sort(key=lambda p: p.at_s)
    return out


def mean_weighted_tokens(trace: Trace, prompt_weight: float, generation_weight: float) -> float:
    return float(np.mean(prompt_weight * trace.prompt + generation_weight * trace.generated))


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    sent_times: deque[float] = field(default_factory=deque)
    latencies: list[float] = field(default_factory=list)

    def arrivals_per_s(self, window_s: float) -> float:
        now = time.monotonic()
        while self.sent_times and self.sent_times[0] < now - window_s:
            self.sent_times.popleft()
        return len(self.sent_times) / window_s


async def replay(
    planned: list[Planned], targets: list[str], model: str, stats: LoadStats, stop: asyncio.Event
) -> None:
    """Send each planned request at its time, round robin over ``targets``."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for i, p in enumerate(planned):
            delay = start + p.at_s - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            task = asyncio.create_task(_one(session, targets[i % len(targets)], model, p, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # Everything is sent: wait for the answers, unless stopped first.
        if tasks and not stop.is_set():
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
            while tasks and not stop.is_set():
                await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one(session: aiohttp.ClientSession, target: str, model: str, p: Planned, stats: LoadStats) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": " ".join(["word"] * p.prompt)}],
        "max_tokens": p.generate,
        "stream": p.stream,
    }
    stats.sent += 1
    stats.sent_times.append(time.monotonic())
    started = time.monotonic()
    try:
        async with session.post(
            f"{target}/v1/chat/completions", json=body, headers={"X-Tenant-ID": p.tenant}
        ) as r:
            await r.read()
            if r.status == 200:
                stats.ok += 1
                stats.latencies.append(time.monotonic() - started)
            else:
                stats.failed += 1
    except (TimeoutError, aiohttp.ClientError):
        stats.failed += 1
