"""Redis Cluster and Sentinel sets for the tests (token_scaler/redis_topology.py), skipped
where ``redis-server`` or ``redis-cli`` is missing, and a master's lookup for either."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from token_scaler.redis_topology import LocalCluster, LocalSentinel, Node, Secured

Topology = LocalCluster | LocalSentinel


@contextmanager
def running(
    kind: str, *, node_timeout_ms: int = 1000, secured: Callable[[], Secured] | None = None
) -> Iterator[Topology]:
    """A ``cluster`` (3 masters, 3 replicas; ``node_timeout_ms`` its failure detection time;
    ``secured`` makes its password and TLS files) or a ``sentinel`` set (1 master, 2 replicas,
    3 sentinels), stopped at the end."""
    try:
        started: Topology
        if kind == "cluster":
            started = LocalCluster.start(
                node_timeout_ms=node_timeout_ms, secured=secured() if secured is not None else None
            )
        else:
            started = LocalSentinel.start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield started
    finally:
        started.stop()


def master_of(topology: Topology, key: str) -> Node:
    """The master serving ``key`` now."""
    return topology.master_of(key) if isinstance(topology, LocalCluster) else topology.current_master()
