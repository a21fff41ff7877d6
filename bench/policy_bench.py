"""What the policies cost a request: the same sidecar with ``--policy`` and without, same run.

    python -m bench.policy_bench                # ~7 minutes, loopback only
    python -m bench.policy_bench --tenants 50   # the load spread over 50 tenants
    python -m bench.policy_bench --tenants 1000 --zipf 1   # a few busy tenants, a long tail
    python -m bench.policy_bench --pool run1.json run2.json  # the rounds of saved runs as one

Processes: the fake upstream, a private Redis, and four sidecars: two without a policy
(``no-policy`` and ``no-policy-b``, the same thing twice: their difference is how far two
p99s of one thing land apart on this machine, the noise band of the comparison) and two with
every per-request check on (max_tokens cap, daily and monthly budget reserved and settled, a
tenant and a per-model rate limit, a model limit across tenants; limits high enough that
nothing is refused): ``policy`` as configured by default (busy tenants are admitted from
reservation chunks, no round trip) and ``policy-per-request`` with chunks off
(``reservationChunks.seconds: 0``: one Redis round trip per request). Non-streamed chat at a
fixed open-loop rate, rounds interleaved, each target's round after 1 s of unmeasured load
(so each is measured in steady traffic, not coming back from idle; with many tenants, long
enough for each at 0.1 requests/s or more to send 5); ``--tenants N`` spreads it over N
tenants in turn (at 200 requests/s, more than 2,000 tenants are each below the chunks'
default 0.1 requests/s), ``--zipf S`` draws them at random, tenant k weighted 1 / (k + 1) ** S.
Reported: latency p50/p90/p99 of each, the policy's difference and the A/A difference,
pooled and as the median over rounds of each round's difference (robust to a burst of noise
that lands in one target's round), with a 90 % interval for the p99's (from the order of the
rounds' differences: it assumes nothing of their spread), CPU per 1,000
requests, how often each sidecar's event loop ran late (``tokenscaler_event_loop_lag_seconds``:
stalls show there directly, where the latency shows them only through the machine's scatter),
the sidecar's own measure of the check (``tokenscaler_policy_check_seconds``: decisions, and
the Redis round trip when there is one), the check alone in-process, and the floor under any
Redis-backed check: a PING round trip to the same Redis over the same kind of connection.
Results: bench/results/policy.json (with ``--tenants``: policy-tenants-N.json).
``--pool A.json B.json ...`` runs nothing: it reports the p99 medians and intervals over the
rounds of several saved runs together (one run's median moves by a few tenths of a millisecond).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench._common import cpu_seconds, percentiles, redis_for_bench, save
from bench.sidecar_bench import CHAT, open_loop, wait_http, zipf_weights
from sidecar.policy.chunks import STEADY_GAPS
from sidecar.policy.schema import ChunkPolicy
from token_scaler.redis_conn import free_port

POLICY = {
    "scope": "bench",
    "defaults": {
        "maxTokens": {"default": 64, "ceiling": 1024},
        "budget": {"daily": 10**12, "monthly": 10**13},
        "rateLimit": {"tokensPerMinute": 10**10, "perModel": {"bench": 10**10}},
    },
    "modelLimits": {"bench": {"tokensPerMinute": 10**10}},
}


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets from /metrics text: (upper bound, count)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """A quantile of a Prometheus histogram from /metrics text (upper bound of its bucket)."""
    buckets = histogram_buckets(text, name)
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return None


LAG = "tokenscaler_event_loop_lag_seconds"
LAG_OVER_S = (0.002, 0.005, 0.01)  # the shares of the loop-lag samples reported


def lag_over(counts: dict[float, float]) -> dict[str, float | None]:
    """The share of loop-lag samples later than each of ``LAG_OVER_S``, from bucket counts
    (None: the sidecar has no such bucket, or no samples: not the same as never late)."""
    total = counts.get(math.inf, 0.0)
    shares: dict[str, float | None] = {}
    for bound in LAG_OVER_S:
        within = counts.get(bound)
        shares[f"over_{bound * 1000:g}ms"] = (
            (total - within) / total if total and within is not None else None
        )
    return shares


PATHS = ("chunk", "redis", "without_redis")  # tokenscaler_policy_admissions_total{path}
WARM_S = 1.0  # unmeasured load before each target's round


def warm_s(rate: float, tenants: int, zipf: float = 0.0) -> float:
    """Unmeasured load before a round: at least ``WARM_S``, and enough for every tenant at the
    chunks' default ``minRequestsPerSecond`` or more to send ``STEADY_GAPS`` + 1 requests (to
    be seen busy again after idling through the other targets' rounds, as it is on a sidecar
    serving without pause)."""
    requests = STEADY_GAPS + 1
    if not tenants:
        return WARM_S
    weights = zipf_weights(tenants, zipf)
    slowest = rate * weights[-1] / sum(weights)  # requests/s of the rarest tenant
    # At most 15 s (a rarer tenant's requests reserve alone in the first rounds of a run).
    return max(WARM_S, min(requests / slowest, requests / ChunkPolicy().min_requests_per_second, 15.0))


COMPARED = (("policy", "policies"), ("policy-per-request", "policies without chunks"), ("no-policy-b", "A/A"))


def median_interval(diffs: list[float]) -> tuple[float, float, float]:
    """The median of the rounds' differences and an interval that holds the true median with
    at least 90 % confidence: the k-th lowest and highest difference, k the largest for which
    fewer than k of n rounds fall below the median with chance at most 5 % (the binomial
    distribution of the rounds on either side of it). It assumes nothing of the differences'
    spread, and is honest with few rounds, where a bootstrap's interval is too narrow."""
    ordered, n = sorted(diffs), len(diffs)
    k, below = 0, 0.0  # below: the chance that fewer than k + 1 rounds fall below the median
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > 0.05:
            break
        k += 1
    k = max(k, 1)  # with fewer than 5 rounds no interval reaches 90 %: the whole range
    return ordered[k - 1], statistics.median(diffs), ordered[n - k]


def intervals(rounds_p99_ms: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per compared target: [low, median, high] of its rounds' p99 minus ``no-policy``'s."""
    base = rounds_p99_ms["no-policy"]
    return {
        name: [
            round(v, 3)
            for v in median_interval([a - b for a, b in zip(rounds_p99_ms[name], base, strict=True)])
        ]
        for name, _ in COMPARED
    }


def pool(paths: list[str]) -> int:
    """``--pool``: the rounds of several saved runs as one, for a finer median than one run gives."""
    rounds: dict[str, list[float]] = {}
    for path in paths:
        for name, values in json.loads(Path(path).read_text())["rounds_p99_ms"].items():
            rounds.setdefault(name, []).extend(values)
    print(
        f"{len(paths)} runs, {len(rounds['no-policy'])} rounds; "
        "p99 minus no-policy's, median over rounds [90 % interval]:"
    )
    found = intervals(rounds)
    for name, label in COMPARED:
        low, median, high = found[name]
        print(f"  {label:26} {median:+.3f} ms  [{low:+.3f}, {high:+.3f}]")
    return 0


async def metrics_of(session: aiohttp.ClientSession, admin: str) -> str:
    async with session.get(admin + "/metrics") as response:
        return await response.text()


def admitted(text: str, path: str) -> float:
    return sample(text, f'tokenscaler_policy_admissions_total{{path="{path}"}}')


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Measured:
    """What the interleaved rounds measured, per target."""

    latencies: dict[str, list[float]]
    lag: dict[str, dict[float, float]]  # the event-loop lag histogram's buckets, measured rounds
    rounds: list[dict[str, dict[str, float]]]  # per round: target -> latency percentiles
    cpu: dict[str, float]
    paths: dict[str, float]  # admissions by path of the policy target, measured rounds
    metrics: str  # the policy target's /metrics after the last round


async def measure(
    args: argparse.Namespace, targets: dict[str, str], admins: dict[str, str], pids: dict[str, int]
) -> Measured:
    m = Measured(
        {name: [] for name in targets},
        {name: {} for name in targets},
        [],
        dict.fromkeys(targets, 0.0),
        dict.fromkeys(PATHS, 0.0),
        "",
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        for url in targets.values():
            await open_loop(session, url, args.rate, 1)  # warm up
        for _ in range(args.rounds):
            m.rounds.append({})
            for name, url in targets.items():
                # Unmeasured: the rounds measure a sidecar in steady traffic, not one coming
                # back from idling through the other targets' rounds (connections, chunks).
                await open_loop(
                    session,
                    url,
                    args.rate,
                    warm_s(args.rate, args.tenants, args.zipf),
                    args.tenants,
                    args.zipf,
                )
                await _round(session, args, name, url, admins[name], pids[name], m)
        m.metrics = await metrics_of(session, admins["policy"])
    return m


async def _round(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    name: str,
    url: str,
    admin: str,
    pid: int,
    m: Measured,
) -> None:
    """One measured round of one target, added to ``m``."""
    before = await metrics_of(session, admin)
    before_cpu = cpu_seconds(pid)
    load = await open_loop(session, url, args.rate, args.seconds / args.rounds, args.tenants, args.zipf)
    m.cpu[name] += cpu_seconds(pid) - before_cpu
    assert not load.errors, f"{name}: {dict(load.errors)}"
    m.latencies[name] += load.latencies
    m.rounds[-1][name] = percentiles(load.latencies)
    after = await metrics_of(session, admin)
    was = dict(histogram_buckets(before, LAG))
    for bound, count in histogram_buckets(after, LAG):
        m.lag[name][bound] = m.lag[name].get(bound, 0.0) + count - was.get(bound, 0.0)
    if name == "policy":
        for path in PATHS:
            m.paths[path] += admitted(after, path) - admitted(before, path)


def _differences(result: dict[str, Any], rounds: list[dict[str, dict[str, float]]]) -> None:
    """Each target's latency against ``no-policy``: pooled, and the median over rounds of each
    round's difference."""
    pairs = (("added", "policy"), ("added_per_request", "policy-per-request"), ("a_a", "no-policy-b"))
    for key, other in pairs:
        result[f"{key}_ms"] = {
            p: round(result[other][p] - result["no-policy"][p], 3) for p in ("p50", "p90", "p99")
        }
        # A burst of noise on this shared machine lands in one target's round and moves its
        # pooled p99; the median over rounds of each round's difference is robust to that.
        result[f"{key}_median_ms"] = {
            p: round(statistics.median((r[other][p] - r["no-policy"][p]) * 1000 for r in rounds), 3)
            for p in ("p50", "p90", "p99")
        }


def summarize(args: argparse.Namespace, m: Measured) -> dict[str, Any]:
    result: dict[str, Any] = {"rate_per_s": args.rate, "args": vars(args)}
    for name, samples in m.latencies.items():
        result[name] = {k: (round(v * 1000, 3) if k != "n" else v) for k, v in percentiles(samples).items()}
        result[name]["cpu_s_per_1000_requests"] = round(m.cpu[name] / len(samples) * 1000, 3)
        result[name]["loop_lag"] = {
            k: None if v is None else round(v, 5) for k, v in lag_over(m.lag[name]).items()
        }
    _differences(result, m.rounds)
    result["rounds_p99_ms"] = {  # each round's p99, to see the spread behind the medians
        name: [round(r[name]["p99"] * 1000, 3) for r in m.rounds] for name in m.latencies
    }
    result["p99_median_interval_ms"] = intervals(result["rounds_p99_ms"])
    count = sample(m.metrics, "tokenscaler_policy_check_seconds_count")
    total = sample(m.metrics, "tokenscaler_policy_check_seconds_sum")
    result["admissions"] = m.paths  # in the measured rounds
    result["chunks_taken"] = sample(m.metrics, 'tokenscaler_policy_chunks_total{result="taken"}')
    check = "tokenscaler_policy_check_seconds"
    result["check"] = {
        "n": count,
        "mean_ms": round(total / count * 1000, 3) if count else None,
        "p50_bucket_ms": (histogram_quantile(m.metrics, check, 0.5) or 0) * 1000,
        "p99_bucket_ms": (histogram_quantile(m.metrics, check, 0.99) or 0) * 1000,
    }
    return result


async def isolated(redis_url: str, policy: Path, count: int = 3000) -> dict[str, dict[str, float]]:
    """``admit`` alone, in this process, one request at a time: the check without the proxy's
    load; then PING over the same connection: one round trip, the floor under any check."""
    from prometheus_client import CollectorRegistry

    from sidecar import openai
    from sidecar.policy import PolicyEngine
    from token_scaler.redis_channel import Channel

    body = json.dumps({**CHAT, "max_tokens": 16}).encode()
    parsed = openai.parse_request(openai.Kind.CHAT, body)
    assert parsed is not None
    channel = Channel.from_url(redis_url)
    engine = PolicyEngine(policy, channel, CollectorRegistry(), workload="bench/llm")
    headers = {"X-Tenant-ID": "isolated"}
    samples = []
    for i in range(count + 300):
        began = time.perf_counter()
        admission = await engine.admit(headers, parsed, body, 100)
        if i >= 300:
            samples.append(time.perf_counter() - began)
        engine.settle(admission, 100, 16)
        await asyncio.sleep(0)
    await engine.close(5)
    pings = []
    for i in range(count + 300):
        began = time.perf_counter()
        await channel.send("PING")
        if i >= 300:
            pings.append(time.perf_counter() - began)
        await asyncio.sleep(0)
    await channel.close()
    ms = {k: (round(v * 1000, 3) if k != "n" else v) for k, v in percentiles(samples).items()}
    rtt = {k: (round(v * 1000, 3) if k != "n" else v) for k, v in percentiles(pings).items()}
    return {"admit": ms, "ping": rtt}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200, help="non-streamed requests per second")
    parser.add_argument("--seconds", type=float, default=60, help="seconds of load per target")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds")
    parser.add_argument("--tenants", type=int, default=0, help="spread the load over this many tenants")
    parser.add_argument(
        "--zipf", type=float, default=0.0, help="with --tenants: tenant k drawn with weight 1/(k+1)**ZIPF"
    )
    parser.add_argument(
        "--pool",
        nargs="+",
        metavar="RESULT",
        help="no run: pool the rounds of saved results (JSON) and report",
    )
    return parser.parse_args()


def start_sidecar(
    name: str, extra: list[str], upstream: int, redis_url: str, procs: list[subprocess.Popen[bytes]]
) -> tuple[str, str]:
    """Starts one sidecar in front of the upstream (appended to ``procs``); its proxy and
    admin addresses once it is ready."""
    port, admin = free_port(), free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "TOKEN_SCALER_WORKLOAD": "bench/llm"}
    argv = [
        sys.executable, "-m", "token_scaler.cli", "sidecar", "--upstream", f"http://127.0.0.1:{upstream}",
        "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin),
        "--shutdown-delay", "0", "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
    wait_http(f"http://127.0.0.1:{admin}/readyz", procs[-1], name)
    return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


def run(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The upstream, the four sidecars and the load; the targets' names and the result."""
    redis_url, server = redis_for_bench()
    tmp = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    per_request = tmp / "per-request.yaml"
    per_request.write_text(yaml.safe_dump({**POLICY, "reservationChunks": {"seconds": 0}}))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up = free_port()
        procs.append(
            subprocess.Popen([sys.executable, "-m", "bench.sidecar_bench", "--serve-upstream", str(up)])
        )
        wait_http(f"http://127.0.0.1:{up}/metrics", procs[-1], "the upstream")
        targets: dict[str, str] = {}
        admins: dict[str, str] = {}
        pids: dict[str, int] = {}
        sidecars: list[tuple[str, list[str]]] = [
            ("no-policy", []),
            ("policy", ["--policy", str(policy)]),
            ("no-policy-b", []),
            ("policy-per-request", ["--policy", str(per_request)]),
        ]
        for name, extra in sidecars:
            targets[name], admins[name] = start_sidecar(name, extra, up, redis_url, procs)
            pids[name] = procs[-1].pid
        result = summarize(args, asyncio.run(measure(args, targets, admins, pids)))
        for proc in procs[1:]:  # the sidecars' CPU is no longer needed
            proc.terminate()
            proc.wait(timeout=20)
        import uvloop

        result["check_isolated"] = uvloop.run(isolated(redis_url, policy))
        result["check_isolated_per_request"] = uvloop.run(isolated(redis_url, per_request))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=20)
        if server is not None:
            server.stop()
    return list(targets), result


def report(args: argparse.Namespace, targets: list[str], result: dict[str, Any]) -> None:
    print(f"non-streamed chat at {args.rate}/s, {args.rounds} interleaved rounds (latency ms)")
    for name in targets:
        row = result[name]
        print(
            f"  {name:10} p50 {row['p50']:7.3f}  p90 {row['p90']:7.3f}  p99 {row['p99']:7.3f}  n={row['n']}"
        )
    added, noise = result["added_ms"], result["a_a_ms"]
    print(f"  policies add: p50 {added['p50']:+.3f}  p90 {added['p90']:+.3f}  p99 {added['p99']:+.3f}")
    alone = result["added_per_request_ms"]
    print(
        f"  policies without chunks add: p50 {alone['p50']:+.3f}  p90 {alone['p90']:+.3f}"
        f"  p99 {alone['p99']:+.3f}"
    )
    labels = (
        ("policies add", "added_median_ms"),
        ("policies without chunks add", "added_per_request_median_ms"),
        ("A/A", "a_a_median_ms"),
    )
    for label, key in labels:
        row = result[key]
        print(
            f"  {label}, median over rounds of the round's difference: p50 {row['p50']:+.3f}"
            f"  p90 {row['p90']:+.3f}  p99 {row['p99']:+.3f}"
        )
    print("  p99 minus no-policy's, median over rounds [90 % interval of that median]:")
    for name, label in COMPARED:
        low, median, high = result["p99_median_interval_ms"][name]
        print(f"    {label:26} {median:+.3f} ms  [{low:+.3f}, {high:+.3f}]")
    print(
        f"  A/A (no-policy-b - no-policy, the noise band): p50 {noise['p50']:+.3f}"
        f"  p90 {noise['p90']:+.3f}  p99 {noise['p99']:+.3f}"
    )
    print(
        "  CPU per 1,000 requests: "
        + ", ".join(f"{name} {result[name]['cpu_s_per_1000_requests']:.3f} s" for name in targets)
    )
    print("  event loop late (tokenscaler_event_loop_lag_seconds, measured rounds), share of samples:")
    for name in targets:
        shares = result[name]["loop_lag"].items()
        print(f"    {name:20} " + "  ".join(f"{k} {'n/a' if v is None else f'{v:.3%}'}" for k, v in shares))
    paths = result["admissions"]
    print(
        f"  admitted (policy, measured rounds): {paths['chunk']:.0f} from chunks (no round trip), "
        f"{paths['redis']:.0f} with a reservation of their own; {result['chunks_taken']:.0f} chunks taken"
    )
    check = result["check"]
    print(
        f"  the check itself (tokenscaler_policy_check_seconds, warm-ups included), n={check['n']:.0f}: mean "
        f"{check['mean_ms']} ms, p50 <= {check['p50_bucket_ms']:g} ms, p99 <= {check['p99_bucket_ms']:g} ms"
    )
    for what, row in (
        ("admit alone (in-process, sequential, same Redis)", result["check_isolated"]["admit"]),
        ("admit alone without chunks", result["check_isolated_per_request"]["admit"]),
        ("PING round trip (the floor, same connection)", result["check_isolated"]["ping"]),
    ):
        print(f"  {what}: p50 {row['p50']:.3f}  p90 {row['p90']:.3f}  p99 {row['p99']:.3f} ms  n={row['n']}")


def main() -> int:
    args = parse_args()
    if args.pool:
        return pool(args.pool)
    targets, result = run(args)
    report(args, targets, result)
    name = f"policy-tenants-{args.tenants}" if args.tenants else "policy"
    print(f"saved {save(name + (f'-zipf-{args.zipf:g}' if args.zipf else ''), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
