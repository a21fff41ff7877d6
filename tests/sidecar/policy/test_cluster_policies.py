"""The policies across four sidecar processes (one budget, one rate limit) on a Redis Cluster
(3 masters, 3 replicas) and behind Sentinel (1 master, 2 replicas, 3 sentinels): the tests of
tests/sidecar/policy/test_policy_many.py, the same checks, each topology's ``redis_url`` in place of
the session's single Redis. On the cluster each tenant's keys live in their tenant's slot and
the model's limit across tenants in its own, on whichever masters those slots are; so does the
scope's hourly spend (tests/sidecar/policy/test_policy_spend_fleet.py, collected here again).

Then a budget through a failover: while four sidecars spend a tenant's budget, the master of
its slot stops feeding its replicas (so the promoted one lacks what it took since, as a lagging
replica would: replication is asynchronous) and is killed. The sidecars decide without Redis
while no master answers (each its share of what was left), then on the promoted replica. What
the clients were served passes the budget by no more than the bound docs/redis.md states, and
nothing is charged twice."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import aiohttp
import pytest

from tests.sidecar.policy.test_policy_many import (  # collected here again, against each topology
    BUDGET,
    PROMPT_ESTIMATE,
    SIDECARS,
    Fleet,
    chat,
    fleet,
    test_one_budget_across_four_sidecars_is_never_overspent_and_refunds_are_never_lost,
    test_rate_limit_across_four_sidecars_is_within_one_percent,
)
from tests.sidecar.policy.test_policy_spend_fleet import (  # the spend guard's scope-wide key, too
    guarded_fleet,
    test_spend_guard_across_four_sidecar_processes_flips_and_counts_exactly,
)
from tests.topologies import Topology, master_of, running
from token_scaler.redis_conn import sync_client

pytestmark = pytest.mark.cluster

__all__ = [
    "fleet",
    "guarded_fleet",
    "test_one_budget_across_four_sidecars_is_never_overspent_and_refunds_are_never_lost",
    "test_rate_limit_across_four_sidecars_is_within_one_percent",
    "test_spend_guard_across_four_sidecar_processes_flips_and_counts_exactly",
]


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    with running(request.param) as started:
        yield started


@pytest.fixture(scope="module")
def redis_url(topology: Topology) -> str:
    return topology.url


async def test_a_budget_through_a_master_failover_is_passed_by_a_bounded_amount(
    fleet: Fleet, topology: Topology
) -> None:
    """Runs last in the module: the killed master stays dead."""
    # Every sidecar has counted all its peers (its share without Redis is 1/peers), as in a
    # fleet that has run for more than an announcement's period (ANNOUNCE_S): one that has just
    # started counted 1, 2, 3 and 4, and their shares added up to twice what was left.
    scope = f'scope="{fleet.scope}"'
    for _ in range(100):
        if fleet.total("tokenscaler_policy_scope_sidecars", scope) == SIDECARS * SIDECARS:
            break
        await asyncio.sleep(0.1)
    assert fleet.total("tokenscaler_policy_scope_sidecars", scope) == SIDECARS * SIDECARS
    res = fleet.key("failover", "res")
    doomed = master_of(topology, res)
    told = biggest = left = 0
    statuses: dict[int, int] = {}
    recovered, a_third = asyncio.Event(), asyncio.Event()  # a master again; a third served
    rng = random.Random(11)
    workers = SIDECARS * 6

    async def worker(url: str) -> None:
        nonlocal told, biggest
        async with aiohttp.ClientSession() as session:
            refusals = 0
            # Three refusals in a row once a master answers again, a second apart: longer than
            # a sidecar takes to find Redis back (it decides without it until then, on its
            # share of what it last saw left).
            while refusals < 3:
                max_tokens = rng.randint(10, 200)
                biggest = max(biggest, PROMPT_ESTIMATE + max_tokens)
                status, tokens, _ = await chat(
                    session, url, "failover", max_tokens, stream=rng.random() < 0.5
                )
                statuses[status] = statuses.get(status, 0) + 1
                told += tokens
                if told >= BUDGET // 3:
                    a_third.set()
                refusals = refusals + 1 if status == 429 and recovered.is_set() else 0
                if status == 429:
                    await asyncio.sleep(1.0 if recovered.is_set() else 0.05)

    async def failover() -> None:
        nonlocal left
        await a_third.wait()
        left = BUDGET - told  # what the sidecars may spend without Redis, their shares together
        doomed.cut_replicas()
        doomed.kill()
        await asyncio.get_running_loop().run_in_executor(None, topology.wait_failover, doomed)
        recovered.set()

    await asyncio.gather(failover(), *(worker(url) for url in fleet.urls for _ in range(workers // SIDECARS)))
    client = sync_client(fleet.redis_url)
    try:
        for _ in range(200):  # settlements run just after each response, chunks close when idle
            if client.hlen(res) == 0:
                break
            await asyncio.sleep(0.1)
        # A settlement the failover lost leaves its reservation open until its lease ends.
        reserved: list[bytes] = client.hvals(res)  # type: ignore[assignment]  # sync client
        held = sum(int(v.split(b":")[0]) for v in reserved)
        used = sum(
            int(client.get(k) or 0) for k in client.scan_iter(match=fleet.key("failover", "budget:d:*"))
        )
    finally:
        client.close()
    lost = fleet.total("tokenscaler_policy_redis_errors_total", 'op="reservation_lost"')
    chunks_lost = fleet.total("tokenscaler_policy_redis_errors_total", 'op="chunk_lost"')
    chunked = fleet.total("tokenscaler_policy_admissions_total", 'path="chunk"')
    without = fleet.total("tokenscaler_policy_admissions_total", 'path="without_redis"')
    print(
        f"\nbudget {BUDGET} through a failover: served {told} (over by {told - BUDGET}), charged {used} "
        f"(of which {held} still reserved); largest reservation {biggest}; {without:.0f} admitted "
        f"without Redis, {lost:.0f} reservations and {chunks_lost:.0f} chunks lost and charged without; "
        f"{chunked:.0f} admitted from chunks; {statuses}"
    )
    assert statuses[200] > 100 and statuses.get(429, 0) >= 3 * workers
    assert told >= BUDGET - held - biggest, (told, used, held)  # spent down to what stays reserved
    # The bound of docs/redis.md is one reservation per request in flight when the replicas fell
    # behind (lost admissions and settlements), plus what the sidecars admitted without Redis and
    # had not charged yet when it answered again (at most what was left: ``left``), plus one.
    # With every sidecar's peers counted, the last part stays small (ten runs served 19,609 to
    # 22,398), so the test holds the fleet to the rest; with stale counts it passed by up to 10,779.
    assert told - BUDGET <= biggest * (1 + workers), (told, left)
    assert used - held <= told  # nothing charged twice
