"""From zero and back, as processes: the scaler, gateways, model replicas (fake model server +
real sidecar) and a stand-in for KEDA + HPA polling the scaler over gRPC (``processes.py``).

Asserted: every request is answered (the official ``openai`` SDK is the client), once; the
workload is activated by the held requests and scaled back to zero after the cooldown; a
replica killed mid-stream breaks only its own streams, later requests are all answered; and
the first answer comes at most ``FIRST_ANSWER_BOUND_S`` after the replica announced itself
(``first_answer_bound``). The other timings (activation, replica start) are printed as
``GATEWAY ...`` lines (``pytest -s``), not asserted: they depend on this machine's load.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import redis

from bench._common import Scaler
from tests.gateway.processes import Autoscaler, GatewayProcess
from tests.sidecar.conftest import arrivals, totals
from token_scaler.record import GATEWAY, decode, stream_key

METADATA = {
    "tokensPerSecondPerReplica": "400",
    "headroom": "1.0",
    "windowSeconds": "10",
    "panicWindowSeconds": "2",
    "activationTokensPerSecond": "0",
}


# The bound: a replica's first answer at most this long after the replica is there.
FIRST_ANSWER_BOUND_S = 1.5


def first_answer_bound(gateway: GatewayProcess, replica: str) -> dict[str, Any]:
    """The replica's first answer to a held request came at most ``FIRST_ANSWER_BOUND_S`` after
    it announced itself, by the gateway's own record of it (``/debug/replicas``).

    Measured inside the gateway, not by this test: the replica announced itself after the
    gateway's read before the one that listed it (``announcedWithinSeconds``: the time between
    those reads on Redis' clock, one discovery interval when the gateway keeps up), the held
    requests were handed to it by that very read (``heldSentInThatRead``: a count of reads, not
    a time), and the first answer began to go out ``heldAnswerAfterDiscoverySeconds`` after it
    (a forward over loopback to a sidecar and the fake model server). What the test process,
    the stand-in for KEDA and the processes' start-up take is outside the span, so the machine's
    load reaches it only through the gateway's own loop: against one discovery interval (0.1 s)
    plus a loopback round trip, the bound leaves a margin of more than ten times."""
    [pool] = gateway.debug()["workloads"]
    [seen] = [r["discovery"] for r in pool["replicas"] if r["id"] == replica]
    assert seen["heldSentInThatRead"], seen
    announced, answered = seen["announcedWithinSeconds"], seen["heldAnswerAfterDiscoverySeconds"]
    assert announced is not None and answered is not None, seen
    assert announced + answered <= FIRST_ANSWER_BOUND_S, seen
    return dict(seen)


def report(what: str, **figures: Any) -> None:
    print(f"GATEWAY {what}: " + json.dumps(figures, default=str), flush=True)


async def until(check: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {within_s:g}s waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def scaler(redis_url: str) -> AsyncIterator[Scaler]:
    process = await asyncio.to_thread(Scaler, redis_url)
    try:
        yield process
    finally:
        await asyncio.to_thread(process.stop)


async def start_gateways(n: int, redis_url: str, workload: str, log: Path) -> list[GatewayProcess]:
    gateways = [GatewayProcess(redis_url, workload, log) for _ in range(n)]
    await asyncio.gather(*(g.start() for g in gateways))
    return gateways


def sdk(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)


async def ask(client: openai.AsyncOpenAI, i: int, *, stream: bool, delay: float = 0.0) -> tuple[float, int]:
    """One request of ``8 + i`` tokens; (monotonic time of its answer's end, tokens received)."""
    headers = {"X-Fake-Delay": str(delay)} if delay else None
    if stream:
        chunks = await client.completions.create(
            model="fake",
            prompt=f"request {i}",
            max_tokens=8 + i,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        usage = [c.usage async for c in chunks if c.usage is not None]
        return time.monotonic(), usage[0].completion_tokens
    answer = await client.completions.create(
        model="fake", prompt=f"request {i}", max_tokens=8 + i, extra_headers=headers
    )
    assert answer.usage is not None
    return time.monotonic(), answer.usage.completion_tokens


def stream_sums(redis_url: str, workload: str) -> tuple[dict[str, int], dict[str, int]]:
    """Sums of the gateways' entries and of the sidecars' entries (counters, ``ar`` among them)."""
    client = redis.Redis.from_url(redis_url)
    try:
        records = [decode(fields) for _id, fields in client.xrange(stream_key(workload))]
    finally:
        client.close()
    held = [r for r in records if r.role == GATEWAY]
    served = [r for r in records if r.role != GATEWAY]
    return {**totals(held), "ar": arrivals(held)}, {**totals(served), "ar": arrivals(served)}


async def test_from_zero_through_two_gateways_and_back_to_zero(
    scaler: Scaler, redis_url: str, workload: str, tmp_path: Path
) -> None:
    log = tmp_path / "processes.log"
    gateways = await start_gateways(2, redis_url, workload, log)
    clients = [sdk(g) for g in gateways]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel:
        autoscaler = Autoscaler(channel, "scaler:9090", workload, METADATA, redis_url, log)
        await autoscaler.start()
        try:
            await asyncio.sleep(1.0)
            assert autoscaler.replicas == [] and autoscaler.activations == []
            sent = time.monotonic()
            results = await asyncio.gather(*(ask(clients[i % 2], i, stream=i % 4 < 2) for i in range(8)))
            # Every request answered in full, once (the two gateways held four each).
            assert [tokens for _, tokens in results] == [8 + i for i in range(8)]
            first = autoscaler.started_replicas[0]
            assert autoscaler.activations and autoscaler.activations[0] <= first.started
            first_answer = min(t for t, _ in results)
            bounds = [first_answer_bound(g, first.name) for g in gateways]
            report(
                "from zero",
                activated_after_first_request_s=round(autoscaler.activations[0] - sent, 3),
                replica_start_after_first_request_s=round(first.started - sent, 3),
                replica_start_to_ready_s=round(first.ready - first.started, 3),
                first_answer_after_replica_ready_s=round(first_answer - first.ready, 3),
                last_answer_after_replica_ready_s=round(max(t for t, _ in results) - first.ready, 3),
                replicas_started=len(autoscaler.started_replicas),
                gateways_discovery=bounds,
            )

            # Back to zero once the window holds no demand and the cooldown has passed.
            await until(lambda: not autoscaler.replicas, 90, "the scale-down to zero")
            sidecars = [r.sidecar for r in autoscaler.started_replicas if r.sidecar is not None]
            await until(lambda: all(p.poll() is not None for p in sidecars), 20, "the sidecars' exit")
            assert [p.returncode for p in sidecars] == [0] * len(sidecars), "a sidecar did not exit cleanly"
            for gateway in gateways:
                await until(
                    lambda g=gateway: g.metrics()["tokenscaler_gateway_replicas"] == 0,
                    10,
                    "the gateway's view",
                )
            went_idle = [row for row in autoscaler.timeline if not row["active"]]
            report("back to zero", timeline_rows=len(autoscaler.timeline), first_inactive=went_idle[:1])
        finally:
            await autoscaler.close()
            for client in clients:
                await client.close()
            codes = [gateway.stop() for gateway in gateways]
            assert codes == [0, 0], f"gateway exit codes {codes}; see {log}"

    # Counted once: the gateways' entries sum to zero, the sidecars' hold every request.
    held, served = stream_sums(redis_url, workload)
    assert held == {"sp": 0, "sg": 0, "ap": 0, "ag": 0, "rq": 0, "ar": 0}
    assert served["rq"] == served["ar"] == 8
    assert served["sg"] == served["ag"] == sum(8 + i for i in range(8))


async def test_a_replica_killed_mid_stream_breaks_only_its_streams(
    scaler: Scaler, redis_url: str, workload: str, tmp_path: Path
) -> None:
    log = tmp_path / "processes.log"
    [gateway] = await start_gateways(1, redis_url, workload, log)
    client = sdk(gateway)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel:
        autoscaler = Autoscaler(channel, "scaler:9090", workload, METADATA, redis_url, log, min_replicas=2)
        await autoscaler.start()
        try:
            await until(lambda: len(autoscaler.replicas) == 2, 30, "two replicas")
            await until(
                lambda: gateway.metrics()["tokenscaler_gateway_replicas"] == 2, 10, "the gateway's view"
            )
            # Four slow streams (40 events at 50 ms), spread two and two by tokens.
            streams = [asyncio.create_task(ask(client, 32, stream=True, delay=0.05)) for _ in range(4)]
            await asyncio.sleep(0.8)
            victim = autoscaler.replicas[0]
            await asyncio.to_thread(victim.kill)
            outcomes = await asyncio.gather(*streams, return_exceptions=True)
            broken = [o for o in outcomes if isinstance(o, BaseException)]
            whole = [o for o in outcomes if not isinstance(o, BaseException)]
            assert len(broken) == 2 and all(tokens == 40 for _, tokens in whole), outcomes
            # Later requests are all answered: the dead replica refuses connections until its
            # heartbeat ages out, and the gateway sends them to the other; the stand-in's
            # Deployment replaces the dead one.
            later = await asyncio.gather(*(ask(client, i, stream=i % 2 == 0) for i in range(6)))
            assert [tokens for _, tokens in later] == [8 + i for i in range(6)]
            await until(lambda: len(autoscaler.started_replicas) == 3, 30, "the replacement")
            metrics = gateway.metrics()
            assert metrics["tokenscaler_gateway_broken_streams_total"] == 2
            report(
                "killed mid-stream",
                broken=[type(b).__name__ for b in broken],
                retries=metrics["tokenscaler_gateway_retries_total"],
            )
        finally:
            await autoscaler.close()
            await client.close()
            assert gateway.stop() == 0
