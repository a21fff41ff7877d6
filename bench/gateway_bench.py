"""The gateway's cost and its routing's effect, each against a baseline in the same run.

    python -m bench.gateway_bench route      # one routing decision, 8 / 200 / 1000 replicas, vs round-robin
    python -m bench.gateway_bench latency    # added latency at 200 req/s: direct, sidecar, gateway + sidecar
    python -m bench.gateway_bench mixed      # short and very long requests over 8 simulated replicas:
                                             # token-weighted vs round-robin vs least-connections

``route`` times ``Router.pick`` in-process while requests start and end at random (every
replica with a capacity, so the cap is checked on every call). ``latency`` runs the fake
model server, a sidecar and a gateway as processes and sends the same open-loop load to each
target in interleaved rounds (``bench.sidecar_bench.open_loop``). ``mixed`` is a simulation:
the gateway's ``Router`` (and the two baselines) place a seeded trace on 8 replicas of the
continuous-batching model of ``tuning/replica.py``'s defaults (25 ms + 0.5 ms per sequence per
step, 6,000 prompt tokens/s, 32 sequences); it reports the p50/p99 time to first token and
the spread of in-flight tokens across replicas (sampled every 100 ms). Results go to
``bench/results/gateway-<mode>.json``.

``latency --seconds 30`` on the 2-core development VM (shared, load average 1.1 to 4.5), eight
runs alternating the gateway on aiohttp's client and server (commit 1cd13d3) with its own HTTP/1.1
data path: the added p50 through gateway + sidecar was 1.71x to 1.97x the sidecar alone's before,
1.31x to 1.54x after (1.31x to 1.38x at load average 1 to 3.3, up to 1.54x at 3.4 to 4.5); the gateway's
CPU per 1,000 requests 0.43 to 0.49 s before, 0.23 to 0.32 s after (the README's gateway section
has the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import percentiles, redis_for_bench, save
from bench.sidecar_bench import CHAT, Load, cpu_of, open_loop, wait_http
from gateway.router import Replica, Router
from token_scaler.presence import Announcement
from token_scaler.redis_conn import free_port

# -- route: one decision -------------------------------------------------------------------


def bench_route(replicas: int, calls: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    router = Router()
    router.update({f"r{i}": (1, Announcement(f"http://r{i}", ("m",), 40_000)) for i in range(replicas)})
    pool = list(router.replicas.values())
    open_: deque[tuple[Replica, int]] = deque()
    picks: list[float] = []
    rr: list[float] = []
    cycle = itertools.cycle(pool)
    clock = time.perf_counter_ns
    for _ in range(calls):
        tokens = rng.choice((300, 300, 300, 4000))
        started = clock()
        replica = router.pick("m", tokens)
        picks.append(clock() - started)
        started = clock()
        next(cycle)
        rr.append(clock() - started)
        if replica is not None:
            router.start(replica, tokens)
            open_.append((replica, tokens))
        # about as many requests end as start, keeping the replicas near half full
        while open_ and (replica is None or len(open_) > replicas * 8):
            done, t = open_.popleft()
            router.finish(done, t)
    as_us = {k: round(v / 1000, 2) for k, v in percentiles(picks, (50, 99, 99.9)).items() if k != "n"}
    rr_us = {k: round(v / 1000, 3) for k, v in percentiles(rr, (50, 99, 99.9)).items() if k != "n"}
    return {"replicas": replicas, "calls": calls, "pick_us": as_us, "round_robin_us": rr_us}


# -- latency: processes --------------------------------------------------------------------


class Processes:
    def __init__(self, profile: str | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_url, self.redis = redis_for_bench()
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        workload = f"bench/gw-{os.getpid()}"
        up = free_port()
        self.start([sys.executable, "-m", "tests.sidecar.fake_upstream", "--port", str(up)])
        wait_http(f"http://127.0.0.1:{up}/metrics", self.procs[-1], "the upstream")
        port, admin = free_port(), free_port()
        self.start(
            [
                sys.executable, "-m", "token_scaler.cli", "sidecar", "--workload", workload,
                "--redis-url", self.redis_url, "--upstream", f"http://127.0.0.1:{up}",
                "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin),
                "--advertise", f"http://127.0.0.1:{port}", "--models", str(CHAT["model"]),
                "--shutdown-delay", "0", "--log-level", "WARNING",
            ]
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{admin}/readyz", self.procs[-1], "the sidecar")
        gport, gadmin = free_port(), free_port()
        self.start(
            [
                sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []),
                "-m", "token_scaler.cli", "gateway", "--workload", workload,
                "--redis-url", self.redis_url, "--host", "127.0.0.1", "--port", str(gport),
                "--admin-port", str(gadmin), "--shutdown-delay", "0", "--log-level", "WARNING",
            ]
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{gadmin}/readyz", self.procs[-1], "the gateway")
        # the proxies' pids: their CPU per request is part of what they add
        self.pids = {"sidecar": self.procs[1].pid, "gateway": self.procs[2].pid}
        self.targets = {
            "direct": f"http://127.0.0.1:{up}",
            "sidecar": f"http://127.0.0.1:{port}",
            "gateway+sidecar": f"http://127.0.0.1:{gport}",
        }

    def start(self, argv: list[str]) -> None:
        log = (self.tmp / "processes.log").open("ab")
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
        )
        log.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis is not None:
            self.redis.stop()


async def bench_latency(procs: Processes, rate: float, seconds: float, rounds: int) -> dict[str, Any]:
    loads = {name: Load() for name in procs.targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # warm-up: connections, the gateway's discovery, the sidecar's first flush
        for url in procs.targets.values():
            await open_loop(session, url, rate, 1.0)
        cpu = {name: {"sidecar": 0.0, "gateway": 0.0} for name in procs.targets}
        for _ in range(rounds):
            for name, url in procs.targets.items():
                before = {k: cpu_of(pid) for k, pid in procs.pids.items()}
                load = await open_loop(session, url, rate, seconds / rounds)
                for k, pid in procs.pids.items():
                    cpu[name][k] += cpu_of(pid) - before[k]
                loads[name].latencies += load.latencies
                loads[name].errors += load.errors
    out: dict[str, Any] = {"rate_per_s": rate, "seconds_per_target": seconds, "rounds": rounds}
    direct = percentiles(loads["direct"].latencies)
    for name, load in loads.items():
        stats = percentiles(load.latencies)
        row: dict[str, Any] = {
            "latency_ms": {k: round(v * 1000, 3) for k, v in stats.items() if k != "n"},
            "answered": len(load.latencies),
            "errors": dict(load.errors),
        }
        if load.latencies:
            row["cpu_s_per_1000_requests"] = {
                k: round(v / len(load.latencies) * 1000, 3) for k, v in cpu[name].items() if v
            }
        if name != "direct":
            row["added_ms"] = {p: round((stats[p] - direct[p]) * 1000, 3) for p in ("p50", "p90", "p99")}
        out[name] = row
    sidecar = out["sidecar"]["added_ms"]
    both = out["gateway+sidecar"]["added_ms"]
    out["added_p50_ratio_gateway_sidecar_vs_sidecar"] = round(both["p50"] / sidecar["p50"], 2)
    return out


# -- mixed: simulated replicas ------------------------------------------------------------

STEP_BASE_S = 0.025
STEP_PER_SEQ_S = 0.0005
PREFILL_PER_S = 6000.0
CHUNK = 2048
SLOTS = 32


@dataclass(eq=False)
class Req:
    arrival: float
    prompt: int
    generation: int
    weight: int
    left_prompt: int = 0
    left_gen: int = 0
    first: float | None = None
    replica: int = -1


@dataclass
class SimReplica:
    index: int
    queue: deque[Req] = field(default_factory=deque)
    active: list[Req] = field(default_factory=list)
    stepping: bool = False


class Policy:
    name = ""

    def pick(self, req: Req) -> int | None:  # None: hold at the gateway
        raise NotImplementedError

    def started(self, req: Req) -> None:
        pass

    def progress(self, req: Req) -> None:
        pass

    def ended(self, req: Req) -> None:
        pass


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, n: int) -> None:
        self.cycle = itertools.cycle(range(n))

    def pick(self, req: Req) -> int | None:
        return next(self.cycle)


class LeastConnections(Policy):
    name = "least-connections"

    def __init__(self, n: int) -> None:
        self.open = [0] * n

    def pick(self, req: Req) -> int | None:
        return min(range(len(self.open)), key=self.open.__getitem__)

    def started(self, req: Req) -> None:
        self.open[req.replica] += 1

    def ended(self, req: Req) -> None:
        self.open[req.replica] -= 1


class TokenWeighted(Policy):
    """The gateway's own ``Router``, with a per-replica in-flight token cap."""

    def __init__(self, n: int, capacity: int) -> None:
        self.name = f"token-weighted (gateway), {SLOTS} slots" + (
            f", cap {capacity} tokens" if capacity else ""
        )
        self.router = Router()
        self.router.update(
            {str(i): (1, Announcement(f"http://r{i}", (), capacity, slots=SLOTS)) for i in range(n)}
        )
        self.replicas = [self.router.replicas[str(i)] for i in range(n)]
        self.index = {id(r): i for i, r in enumerate(self.replicas)}

    def pick(self, req: Req) -> int | None:
        replica = self.router.pick(None, req.weight, now=0.0)
        return None if replica is None else self.index[id(replica)]

    def started(self, req: Req) -> None:
        self.router.start(self.replicas[req.replica], req.weight)

    def progress(self, req: Req) -> None:
        self.router.progress(self.replicas[req.replica], 1)

    def ended(self, req: Req) -> None:
        self.router.finish(self.replicas[req.replica], req.weight - (req.generation - req.left_gen))


def mixed_trace(rate: float, seconds: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    while t < seconds:
        t += rng.expovariate(rate)
        if rng.random() < 0.1:  # very long: a long document in, a long answer out
            prompt, generation = rng.randint(1500, 3000), rng.randint(1000, 2000)
        else:
            prompt, generation = rng.randint(100, 400), rng.randint(20, 80)
        out.append(Req(t, prompt, generation, prompt + generation))
    return out


def engine_step(replica: SimReplica, now: float, policy: Policy) -> tuple[float, list[Req]]:
    """One continuous-batching step of a replica: (its duration, the requests it ended)."""
    while replica.queue and len(replica.active) < SLOTS:
        replica.active.append(replica.queue.popleft())
    decoding = [r for r in replica.active if r.left_prompt == 0]
    budget = CHUNK - len(decoding)
    prefilled = 0
    for r in replica.active:
        if r.left_prompt and budget > 0:
            take = min(budget, r.left_prompt)
            r.left_prompt -= take
            budget -= take
            prefilled += take
    step = STEP_BASE_S + STEP_PER_SEQ_S * len(decoding) + prefilled / PREFILL_PER_S
    finished = []
    for r in decoding:
        if r.first is None:
            r.first = now + step
        r.left_gen -= 1
        policy.progress(r)
        if r.left_gen == 0:
            finished.append(r)
    for r in finished:
        replica.active.remove(r)
        policy.ended(r)
    return step, finished


def spread(replicas: list[SimReplica]) -> float | None:
    """(max - min) / mean of the replicas' in-flight tokens (prompt + remaining generation)."""
    loads = [
        sum(r.left_prompt + r.left_gen for r in rep.active) + sum(r.weight for r in rep.queue)
        for rep in replicas
    ]
    mean = statistics.fmean(loads)
    return (max(loads) - min(loads)) / mean if mean > 0 else None


class Simulation:
    """The trace through a policy onto ``n`` replicas, event by event."""

    def __init__(self, policy: Policy, n: int) -> None:
        self.policy = policy
        self.replicas = [SimReplica(i) for i in range(n)]
        self.held: deque[Req] = deque()
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()

    def push(self, at: float, kind: str, item: Any) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, item))

    def send(self, req: Req, i: int, now: float) -> None:
        req.replica = i
        req.left_prompt, req.left_gen = req.prompt, req.generation
        self.policy.started(req)
        replica = self.replicas[i]
        replica.queue.append(req)
        if not replica.stepping:
            replica.stepping = True
            self.push(now, "step", replica)

    def dispatch(self, now: float) -> None:
        while self.held:
            i = self.policy.pick(self.held[0])
            if i is None:
                return
            self.send(self.held.popleft(), i, now)

    def run(self, trace: list[Req], sample_s: float) -> tuple[list[Req], list[float]]:
        for req in trace:
            self.push(req.arrival, "arrive", req)
        self.push(0.0, "sample", None)
        end = trace[-1].arrival
        spreads: list[float] = []
        done: list[Req] = []
        while self.events:
            now, _, kind, item = heapq.heappop(self.events)
            if kind == "arrive":
                i = None if self.held else self.policy.pick(item)
                if i is None:
                    self.held.append(item)
                else:
                    self.send(item, i, now)
            elif kind == "sample":
                if now <= end:
                    value = spread(self.replicas)
                    if value is not None:
                        spreads.append(value)
                    self.push(now + sample_s, "sample", None)
            elif not (item.queue or item.active):
                item.stepping = False
            else:
                step, finished = engine_step(item, now, self.policy)
                done += finished
                if finished:
                    self.dispatch(now + step)
                self.push(now + step, "step", item)
        return done, spreads


def simulate(policy: Policy, trace: list[Req], n: int, sample_s: float = 0.1) -> dict[str, Any]:
    done, spreads = Simulation(policy, n).run(trace, sample_s)
    ttft = [r.first - r.arrival for r in done if r.first is not None]
    short = [r.first - r.arrival for r in done if r.first is not None and r.generation < 500]
    return {
        "requests": len(done),
        "ttft_s": {k: round(v, 3) for k, v in percentiles(ttft, (50, 90, 99)).items() if k != "n"},
        "ttft_short_requests_s": {
            k: round(v, 3) for k, v in percentiles(short, (50, 99)).items() if k != "n"
        },
        "inflight_token_spread": {
            "mean": round(statistics.fmean(spreads), 3),
            **{k: round(v, 3) for k, v in percentiles(spreads, (50, 99)).items() if k != "n"},
        },
    }


def bench_mixed(replicas: int, rate: float, seconds: float, capacity: int, seed: int) -> dict[str, Any]:
    policies: list[Callable[[], Policy]] = [
        lambda: RoundRobin(replicas),
        lambda: LeastConnections(replicas),
        lambda: TokenWeighted(replicas, 0),
    ]
    if capacity:
        policies.append(lambda: TokenWeighted(replicas, capacity))
    out: dict[str, Any] = {
        "replicas": replicas,
        "rate_per_s": rate,
        "seconds": seconds,
        "capacity_tokens": capacity,
        "seed": seed,
        "spread": "(max - min) / mean of in-flight tokens across replicas, sampled every 100 ms",
    }
    for make in policies:
        policy = make()
        out[policy.name] = simulate(policy, mixed_trace(rate, seconds, seed), replicas)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_bench")
    sub = parser.add_subparsers(dest="mode", required=True)
    route = sub.add_parser("route")
    route.add_argument("--calls", type=int, default=100_000)
    latency = sub.add_parser("latency")
    latency.add_argument("--rate", type=float, default=200.0)
    latency.add_argument("--seconds", type=float, default=30.0, help="per target, over all rounds")
    latency.add_argument("--rounds", type=int, default=3)
    latency.add_argument("--profile", help="write the gateway's cProfile stats here")
    mixed = sub.add_parser("mixed")
    mixed.add_argument("--replicas", type=int, default=8)
    mixed.add_argument("--rate", type=float, default=20.0)
    mixed.add_argument("--seconds", type=float, default=600.0)
    mixed.add_argument(
        "--capacity",
        type=int,
        default=0,
        help="also run the token-weighted policy with this in-flight token cap",
    )
    mixed.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, Any]
    if args.mode == "route":
        result = {"runs": [bench_route(n, args.calls) for n in (8, 200, 1000)]}
    elif args.mode == "latency":
        procs = Processes(args.profile)
        try:
            result = asyncio.run(bench_latency(procs, args.rate, args.seconds, args.rounds))
        finally:
            procs.stop()
    else:
        result = {
            "runs": [
                bench_mixed(args.replicas, args.rate, args.seconds, args.capacity, seed)
                for seed in range(1, args.seeds + 1)
            ]
        }
    print(json.dumps(result, indent=2))
    path = save(f"gateway-{args.mode}", result)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
