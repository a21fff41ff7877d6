"""The policy path's admission round trip with each Redis client, same run, same Redis servers.

    python -m bench.redis_client_bench               # ~1 minute, loopback only
    python -m bench.redis_client_bench --calls 5000 --rounds 5

One process runs ``admit.lua`` (the script every request the policies reserve for runs, with
its real keys and arguments: budgets, both rate limits, a lease) over 1,000 tenants in turn,
through four clients, rounds interleaved:

- ``channel``: the sidecar's hand-written pipelined client (token_scaler/redis_channel.py) to
  one ``redis-server``;
- ``redis-py``: redis-py's asyncio client (hiredis parser, the project's packed connection),
  ``Script`` objects, to the same server;
- ``channel-cluster``: the hand-written client routing by slot (token_scaler/redis_routing.py)
  to a 3-master Redis Cluster (each master with a replica);
- ``redis-py-cluster``: redis-py's ``RedisCluster`` to the same cluster;
- ``channel-replicated``: the hand-written client to a master with two replicas (a Sentinel
  set's), and ``channel-replicated+WAIT``: the same, each admission followed by ``WAIT 1 100``
  on its connection (the reply waits until a replica has the admission): what making the
  budgets' writes survive a failover would add to every request.

Each is measured alone (one request at a time: the round trip a request adds) and with
``--concurrency`` requests in flight (a busy sidecar: what queueing in the client adds).
Reported per client: latency p50/p99 in ms, and the client's CPU per call (the process's CPU
time over the calls: on two shared cores, CPU is what a busy sidecar's p99 pays). The policy
path's budget is 1 ms added p99. Results: bench/results/redis_clients.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bench._common import percentiles, save
from sidecar.policy import scripts
from sidecar.policy.store import _ADMIT, AdmitArgs, Store, TenantKeys, tenant_keys
from token_scaler.redis_channel import Channel
from token_scaler.redis_conn import LocalRedis, connect
from token_scaler.redis_routing import open_channel
from token_scaler.redis_topology import LocalCluster, LocalSentinel

TENANTS = 1000
DAY, MONTH = "20261204", "202612"
Admit = Callable[[int], Awaitable[Any]]


def admit_args(i: int) -> AdmitArgs:
    return AdmitArgs(
        id=f"r{i}",
        cost=100,
        day_limit=10**12,
        month_limit=10**12,
        least=0,
        tokens=100,
        tenant_interval=repr(0.001),
        tenant_tau=repr(60_000.0),
        model_interval=repr(0.001),
        model_tau=repr(60_000.0),
        lease_ms=60_000,
        day=DAY,
        month=MONTH,
    )


def keys_of(i: int) -> TenantKeys:
    return tenant_keys("bench", f"t{i % TENANTS}", DAY, MONTH, "m")


def through_store(store: Store) -> Admit:
    def admit(i: int) -> Awaitable[Any]:
        a = admit_args(i)
        return store.admit(
            keys_of(i),
            id=a.id,
            cost=a.cost,
            day_limit=a.day_limit,
            month_limit=a.month_limit,
            least=a.least,
            tokens=a.tokens,
            tenant_rate=(0.001, 60_000.0),
            model_rate=(0.001, 60_000.0),
            lease_ms=a.lease_ms,
            day=DAY,
            month=MONTH,
        )

    return admit


def waiting_for_a_replica(store: Store, channel: Channel) -> Admit:
    admit = through_store(store)

    def admit_and_wait(i: int) -> Awaitable[Any]:
        admitted = admit(i)
        return asyncio.gather(admitted, channel.send("WAIT", 1, 100, flush=True))

    return admit_and_wait


def through_redis_py(client: aioredis.Redis | RedisCluster) -> Admit:
    script = client.register_script(_ADMIT.source)

    def admit(i: int) -> Awaitable[Any]:
        return script(keys=list(keys_of(i)), args=scripts.argv(admit_args(i)))

    return admit


async def measure(admit: Admit, calls: int, concurrency: int, offset: int) -> tuple[list[float], float]:
    """Latencies (ms) of ``calls`` admissions, ``concurrency`` in flight; CPU seconds per call."""
    latencies: list[float] = []
    next_call = offset

    async def worker() -> None:
        nonlocal next_call
        while len(latencies) < calls:
            i = next_call
            next_call += 1
            start = time.perf_counter()
            await admit(i)
            latencies.append((time.perf_counter() - start) * 1000)

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies[:calls], (time.process_time() - cpu) / len(latencies)


async def bench(
    single: LocalRedis,
    cluster: LocalCluster,
    replicated: LocalSentinel,
    calls: int,
    rounds: int,
    concurrency: int,
) -> dict[str, Any]:
    channel = open_channel(single.url)
    channel_cluster = open_channel(cluster.url)
    plain = connect(single.url)
    py_cluster = connect(cluster.url)
    to_master = Channel(port=replicated.current_master().port)
    to_master_waiting = Channel(port=replicated.current_master().port)
    clients: dict[str, Admit] = {
        "channel": through_store(Store(channel)),
        "redis-py": through_redis_py(plain),
        "channel-cluster": through_store(Store(channel_cluster)),
        "redis-py-cluster": through_redis_py(py_cluster),
        "channel-replicated": through_store(Store(to_master)),
        "channel-replicated+WAIT": waiting_for_a_replica(Store(to_master_waiting), to_master_waiting),
    }
    samples: dict[str, dict[int, list[float]]] = {name: {1: [], concurrency: []} for name in clients}
    cpu: dict[str, dict[int, list[float]]] = {name: {1: [], concurrency: []} for name in clients}
    offset = 0
    try:
        for admit in clients.values():  # connections made, scripts loaded, maps read
            for i in range(200):
                await admit(i)
        for _ in range(rounds):
            for level in (1, concurrency):
                for name, admit in clients.items():
                    latencies, per_call = await measure(admit, calls, level, offset)
                    offset += calls
                    samples[name][level] += latencies
                    cpu[name][level].append(per_call)
    finally:
        await channel.close()
        await channel_cluster.close()
        await plain.aclose()
        await py_cluster.aclose()
        await to_master.close()
        await to_master_waiting.close()
    result: dict[str, Any] = {
        "calls_per_round": calls,
        "rounds": rounds,
        "concurrency": concurrency,
        "clients": list(clients),
    }
    for name in clients:
        result[name] = {
            f"in_flight_{level}": {
                **{
                    k: round(v, 4) for k, v in percentiles(samples[name][level], (50, 99)).items() if k != "n"
                },
                "cpu_us_per_call": round(sorted(cpu[name][level])[len(cpu[name][level]) // 2] * 1e6, 1),
            }
            for level in (1, concurrency)
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="admissions per client per round and level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    import uvloop

    single = LocalRedis.start()
    try:
        cluster = LocalCluster.start()
        try:
            replicated = LocalSentinel.start()
            try:
                result = uvloop.run(
                    bench(single, cluster, replicated, args.calls, args.rounds, args.concurrency)
                )
            finally:
                replicated.stop()
        finally:
            cluster.stop()
    finally:
        single.stop()
    print(f"admit.lua round trip, {args.rounds} rounds x {args.calls} calls, interleaved (ms; CPU us/call)")
    for level in (1, args.concurrency):
        print(f"  {level} in flight:")
        base = result["channel"][f"in_flight_{level}"]
        for name in result["clients"]:
            row = result[name][f"in_flight_{level}"]
            cpu = row["cpu_us_per_call"]
            print(
                f"    {name:<24} p50 {row['p50']:.3f}  p99 {row['p99']:.3f} ({row['p99'] / base['p99']:.2f}x)"
                f"  CPU {cpu:.0f} us/call ({cpu / base['cpu_us_per_call']:.2f}x)"
            )
    print(f"saved {save('redis_clients', result)}")


if __name__ == "__main__":
    main()
