"""One workload behind the gateway: its live replicas, its hold queue and its held demand.

A gateway serves one or more workloads (``--workload``, ``config.parse_routes``); each is a
``Pool`` of its own: the replicas its sidecars announce under its keys, the requests waiting
for them, and the demand those requests write to its stream. ``Pools.resolve`` sends a request
to the pool of its model:

1. the first workload (in flag order) with a live replica that announces the model;
2. else the workload whose ``--workload`` names the model (it may be at zero: the request
   waits there, and its demand wakes that workload);
3. else the workload that names no models, while it can be serving any model (at zero, or a
   live replica of it announces none);
4. else none: the model is unknown (404, with the models that are known).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gateway.demand import DemandWriter, HeldDemand
from gateway.queue import HoldQueue
from gateway.router import Router


@dataclass(eq=False)
class Pool:
    workload: str
    named: frozenset[str]  # the models --workload names for it
    router: Router
    queue: HoldQueue
    demand: HeldDemand
    writer: DemandWriter

    def models(self) -> set[str]:
        """The models it serves: named, and announced by its live replicas."""
        return set(self.named) | self.router.announced_models()


class UnknownModel(Exception):
    """No workload of this gateway serves the model."""


@dataclass
class Pools:
    pools: list[Pool]

    def __post_init__(self) -> None:
        self._by_name = {m: p for p in self.pools for m in p.named}
        unnamed = [p for p in self.pools if not p.named]
        self._default = unnamed[0] if unnamed else None

    def __iter__(self) -> Iterator[Pool]:
        return iter(self.pools)

    def resolve(self, model: str | None) -> Pool:
        if model is None:
            if len(self.pools) == 1:
                return self.pools[0]
            raise UnknownModel("the request names no model, and this gateway serves several workloads")
        for pool in self.pools:
            if pool.router.announces(model):
                return pool
        named = self._by_name.get(model)
        if named is not None:
            return named
        default = self._default
        if default is not None and default.router.open_to_any():
            return default
        raise UnknownModel(f"the model `{model}` does not exist")

    def models(self) -> list[str]:
        return sorted(set().union(*(p.models() for p in self.pools)))
