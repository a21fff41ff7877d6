"""The fleet at scale: one Redis against a 3-master Redis Cluster, same run, same load.

    python -m bench.scale_bench                                   # the defaults below
    python -m bench.scale_bench --sidecars 20000 --workloads 1000 --seconds 60 --tenants 100000

Two parts, each on one private ``redis-server`` and then on a private cluster of 3 masters
with a replica each (every node on loopback, on this machine's cores):

- **ingest**: ``--sidecars`` sidecars across ``--workloads`` workloads append one record a
  second each through the contract's append script (``token_scaler/record.py``), spread over
  the second as sidecars flush at any phase, while two scaler processes (``token-scaler
  serve``, the replicas of one scaler Deployment, each asked about every workload) follow all
  the streams. Reported: per scaler the entries it applied per second, its lag at the end and
  its CPU and memory; per topology the Redis servers' CPU and memory; CPU per 1,000 entries/s.
- **tenants**: ``--tenants`` tenants, each with a daily and a monthly budget, a tenant rate
  limit and a model rate limit, get one admission and one settlement each (the keys a tenant
  keeps in Redis); then admissions to tenants drawn at random among them, one in flight and
  ``--concurrency`` in flight, through the sidecar's policy client. Reported: Redis memory per
  tenant, admission p50/p99 and the client's CPU per admission.

The load is generated in this process with the project's pipelined client, so the
generator's own CPU shares the cores with what is measured: ``generator_behind_s`` says when
it could not keep the pace. Results: bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench._common import Scaler, cpu_seconds, percentiles, rss_mib, save
from bench.scaler_bench import run_client, workload_name
from sidecar.policy.store import Store, settle_args, tenant_keys
from token_scaler.record import APPEND_SCRIPT, ModelCounts, Record, append_args, seq_key, stream_key
from token_scaler.redis_channel import LuaScript
from token_scaler.redis_conn import LocalRedis, sync_client
from token_scaler.redis_routing import open_channel
from token_scaler.redis_topology import LocalCluster

APPEND = LuaScript(APPEND_SCRIPT)
RETENTION_S = 1200  # the sidecar's default (--retention)
DAY, MONTH, SCOPE, MODEL = "20261204", "202612", "scale", "llm"
SLICES = 10  # each second's appends in 100 ms slices


class Topology:
    """The Redis servers of one run: their URL, their processes' CPU and their memory."""

    def __init__(self, url: str, pids: list[int], ports: list[int], masters: Callable[[], list[int]]) -> None:
        self.url, self.pids, self.ports, self._masters = url, pids, ports, masters

    def cpu_s(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def used_memory(self) -> int:
        """Bytes the masters hold (``INFO memory`` ``used_memory``, summed)."""
        total = 0
        for port in self._masters():
            client = sync_client(f"redis://127.0.0.1:{port}/0")
            try:
                total += int(client.info("memory")["used_memory"])
            finally:
                client.close()
        return total


@contextmanager
def topology(kind: str) -> Iterator[Topology]:
    if kind == "single":
        single = LocalRedis.start()
        try:
            yield Topology(single.url, [single.process.pid], [single.port], lambda: [single.port])
        finally:
            single.stop()
        return
    cluster = LocalCluster.start()

    def masters() -> list[int]:
        return [
            node.port for node in cluster.nodes if node.client().info("replication").get("role") == "master"
        ]

    try:
        yield Topology(
            cluster.url,
            [node.process.pid for node in cluster.nodes],
            [node.port for node in cluster.nodes],
            masters,
        )
    finally:
        cluster.stop()


# -- ingest -----------------------------------------------------------------------------


async def _append_for(url: str, sidecars: list[tuple[str, str]], seconds: int) -> dict[str, float]:
    """Every sidecar appends one record a second for ``seconds``; returns what was offered."""
    channel = open_channel(url)
    seqs = [0] * len(sidecars)
    offered = 0
    behind = 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for second in range(seconds):
            for part in range(SLICES):
                now_ms = int(time.time() * 1000)
                replies = []
                for i in range(part, len(sidecars), SLICES):
                    workload, sidecar = sidecars[i]
                    seqs[i] += 1
                    record = Record(
                        sidecar, seqs[i], now_ms, 1000, {MODEL: ModelCounts(100, 300, 100, 300, 1)}
                    )
                    replies.append(
                        channel.evalsha(
                            APPEND,
                            [stream_key(workload), seq_key(workload, sidecar)],
                            append_args([record], RETENTION_S),
                        )
                    )
                await asyncio.gather(*replies)
                offered += len(replies)
                wait = started + second + (part + 1) / SLICES - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    behind = max(behind, -wait)
    finally:
        await channel.close()
    return {"offered": offered, "elapsed_s": loop.time() - started, "generator_behind_s": behind}


def ingest(where: Topology, args: argparse.Namespace) -> dict[str, Any]:
    scalers = [Scaler(where.url), Scaler(where.url)]
    try:
        for scaler in scalers:  # each replica is asked about every workload, so follows them all
            run_client(scaler.grpc_port, args.workloads, 4, 0.01, True)
        per = args.sidecars // args.workloads
        sidecars = [(workload_name(w), f"pod-{s}") for w in range(args.workloads) for s in range(per)]
        entries = "tokenscaler_scaler_stream_entries_total"
        start_applied = [scaler.metric(entries) for scaler in scalers]
        start_cpu = [cpu_seconds(scaler.proc.pid) for scaler in scalers]
        start_redis_cpu, start_memory = where.cpu_s(), where.used_memory()
        gen_cpu = time.process_time()
        load = asyncio.run(_append_for(where.url, sidecars, args.seconds))
        gen_cpu = time.process_time() - gen_cpu
        elapsed = load["elapsed_s"]
        redis_cpu = where.cpu_s() - start_redis_cpu
        cpu = [cpu_seconds(scaler.proc.pid) - c for scaler, c in zip(scalers, start_cpu, strict=True)]
        time.sleep(1.0)
        applied = [scaler.metric(entries) - a for scaler, a in zip(scalers, start_applied, strict=True)]
        offered = load["offered"]
        rate = offered / elapsed
        memory = where.used_memory() - start_memory
        return {
            "sidecars": len(sidecars),
            "workloads": args.workloads,
            "seconds": args.seconds,
            "offered_entries_per_s": round(rate, 1),
            "generator_behind_s": round(load["generator_behind_s"], 3),
            "generator_cpu_share": round(gen_cpu / elapsed, 3),
            "scalers": [
                {
                    "applied_entries_per_s": round(a / elapsed, 1),
                    "lag_entries_after_1s": offered - a,
                    "cpu_share_of_one_core": round(c / elapsed, 3),
                    "cpu_per_1000_entries_per_s": round(c / elapsed / (rate / 1000), 4),
                    "rss_mib": round(rss_mib(scaler.proc.pid), 1),
                }
                for scaler, a, c in zip(scalers, applied, cpu, strict=True)
            ],
            "redis_cpu_share_of_one_core": round(redis_cpu / elapsed, 3),
            "redis_cpu_per_1000_entries_per_s": round(redis_cpu / elapsed / (rate / 1000), 4),
            "redis_bytes_per_entry": round(memory / offered, 1),
            # every sidecar's stream history at the default retention, one record a second each
            "redis_mib_at_retention": round(memory / offered * len(sidecars) * RETENTION_S / 2**20, 1),
        }
    finally:
        for scaler in scalers:
            scaler.stop()


# -- tenants ----------------------------------------------------------------------------


def _admit(store: Store, tenant: int, request: str) -> Any:
    return store.admit(
        tenant_keys(SCOPE, f"t{tenant}", DAY, MONTH, MODEL),
        id=request,
        cost=100,
        day_limit=10**9,
        month_limit=10**10,
        least=0,
        tokens=100,
        tenant_rate=(1.0, 60_000.0),
        model_rate=(0.001, 60_000.0),
        lease_ms=60_000,
        day=DAY,
        month=MONTH,
    )


async def _tenants(url: str, tenants: int, calls: int, concurrency: int) -> dict[str, Any]:
    channel = open_channel(url)
    store = Store(channel)
    try:
        for start in range(0, tenants, 2000):  # every tenant admitted once and settled
            block = range(start, min(start + 2000, tenants))
            await asyncio.gather(*(_admit(store, t, f"seed{t}") for t in block))
            await store.settle_many(
                [
                    (
                        tenant_keys(SCOPE, f"t{t}", DAY, MONTH, MODEL),
                        settle_args(
                            id=f"seed{t}",
                            cost=90,
                            tokens=90,
                            daily=True,
                            monthly=True,
                            tenant_interval=1.0,
                            model_interval=0.001,
                            unreserved=False,
                        ),
                    )
                    for t in block
                ]
            )
        rng = random.Random(7)
        result: dict[str, Any] = {"tenants": tenants}
        for level in (1, concurrency):
            latencies: list[float] = []
            done = 0

            async def worker(level: int = level, latencies: list[float] = latencies) -> None:
                nonlocal done
                while done < calls:
                    done += 1
                    start = time.perf_counter()
                    await _admit(store, rng.randrange(tenants), f"r{level}-{done}")
                    latencies.append((time.perf_counter() - start) * 1000)

            cpu = time.process_time()
            await asyncio.gather(*(worker() for _ in range(level)))
            cpu = time.process_time() - cpu
            row = {k: round(v, 3) for k, v in percentiles(latencies, (50, 99)).items() if k != "n"}
            row["client_cpu_us_per_admission"] = round(cpu / len(latencies) * 1e6, 1)
            result[f"in_flight_{level}"] = row
        return result
    finally:
        await channel.close()


def tenants(where: Topology, args: argparse.Namespace) -> dict[str, Any]:
    before = where.used_memory()
    result = asyncio.run(_tenants(where.url, args.tenants, args.calls, args.concurrency))
    result["redis_bytes_per_tenant"] = round((where.used_memory() - before) / args.tenants, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sidecars", type=int, default=20_000)
    parser.add_argument("--workloads", type=int, default=1_000)
    parser.add_argument("--seconds", type=int, default=60, help="seconds of appends")
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=5_000, help="admissions per level")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--parts", default="ingest,tenants")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    parts = [p for p in args.parts.split(",") if p]
    result: dict[str, Any] = {}
    for kind in ("single", "cluster"):
        with topology(kind) as where:
            for part in parts:
                result.setdefault(part, {})[kind] = {"ingest": ingest, "tenants": tenants}[part](where, args)
                print(part, kind, result[part][kind], flush=True)
    if "ingest" in result:
        single, cluster = result["ingest"]["single"], result["ingest"]["cluster"]
        result["ingest"]["cluster_over_single"] = {
            "scaler_cpu": round(
                sum(s["cpu_share_of_one_core"] for s in cluster["scalers"])
                / sum(s["cpu_share_of_one_core"] for s in single["scalers"]),
                2,
            ),
            "redis_cpu": round(
                cluster["redis_cpu_share_of_one_core"] / single["redis_cpu_share_of_one_core"], 2
            ),
        }
    if "tenants" in result:
        single, cluster = result["tenants"]["single"], result["tenants"]["cluster"]
        result["tenants"]["cluster_over_single"] = {
            f"p99_in_flight_{level}": round(
                cluster[f"in_flight_{level}"]["p99"] / single[f"in_flight_{level}"]["p99"], 2
            )
            for level in (1, args.concurrency)
        }
    print(f"saved {save('scale', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
