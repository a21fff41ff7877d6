"""The policies across four sidecar processes (one budget, one rate limit) on a Redis Cluster
(3 masters, 3 replicas) and behind Sentinel (1 master, 2 replicas, 3 sentinels): the tests of
tests/sidecar/test_policy_many.py, the same checks, each topology's ``redis_url`` in place of
the session's single Redis. On the cluster each tenant's keys live in their tenant's slot and
the model's limit across tenants in its own, on whichever masters those slots are."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sidecar.test_policy_many import (  # collected here again, against each topology
    fleet,
    test_one_budget_across_four_sidecars_is_never_overspent_and_refunds_are_never_lost,
    test_rate_limit_across_four_sidecars_is_within_one_percent,
)
from token_scaler.redis_topology import LocalCluster, LocalSentinel

pytestmark = pytest.mark.cluster

__all__ = [
    "fleet",
    "test_one_budget_across_four_sidecars_is_never_overspent_and_refunds_are_never_lost",
    "test_rate_limit_across_four_sidecars_is_within_one_percent",
]


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    try:
        topology = LocalCluster.start() if request.param == "cluster" else LocalSentinel.start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield topology.url
    finally:
        topology.stop()
