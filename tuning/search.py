"""The search ``simulate --sweep`` gives every policy (``tuning.compare`` explains what it
looks for and how the results are read).

The runs fall into families: a policy, one of its variants and one scale-down window, whose
headroom is bisected; or the fixed deployment, whose replica count is. A family's runs
depend on each other (each bisection step on the last), families do not, so with ``jobs`` > 1
the families run in that many worker processes (``tuning.workers``). Each family's runs are
kept in the order its bisection made them and the families in the order they were planned,
so a search gives the same runs, in the same order, whatever ``jobs`` is.

The workers receive the ``Search`` once, when they start: its ``simulate`` and
``simulate_fixed`` must then be picklable (module-level functions, or ``functools.partial``
of one), which a ``jobs`` of 1 does not ask.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tuning.compare import Best, Run
from tuning.engine import SimConfig
from tuning.registry import Calibration, Variant, make
from tuning.workers import in_order

RESOLUTION = math.log(1.02)  # the bisection stops when headroom is known within 2 %
# A policy that does not reach a level at the range's top is searched up to this many
# times the top (doubling it), while its fleet still grows: no policy is held by the range.
MAX_WIDENING = 16
FIXED = "fixed"

Simulate = Callable[[Any, SimConfig], dict[str, Any]]  # (policy, config) -> summary
SimulateFixed = Callable[[int], dict[str, Any]]  # replicas -> summary


@dataclass(frozen=True)
class Family:
    """Runs that differ in headroom only (``policy`` FIXED: in the replica count)."""

    policy: str
    variant: Variant
    scale_down_window: float = 0.0


@dataclass(frozen=True)
class Search:
    cal: Calibration
    config: SimConfig
    simulate: Simulate
    levels: Sequence[float]
    headroom_range: tuple[float, float]
    scale_down_windows: Sequence[float]
    progress: bool = False
    simulate_fixed: SimulateFixed | None = None
    max_replicas: int = 0  # the fixed deployment's search runs over 1..max_replicas
    jobs: int = 1

    def policy(self, name: str, variants: Sequence[Variant]) -> Best:
        return self.all([(name, variants)])[name]

    def fixed(self, simulate_fixed: SimulateFixed, max_replicas: int) -> Best:
        """The fewest replicas reaching each level, by bisection over 1..max_replicas."""
        search = replace(self, simulate_fixed=simulate_fixed, max_replicas=max_replicas)
        return search.all([], fixed=True)[FIXED]

    def all(self, policies: Sequence[tuple[str, Sequence[Variant]]], fixed: bool = False) -> dict[str, Best]:
        """Every family of ``policies`` (each policy's variants by scale-down window), then the
        fixed deployment's when ``fixed``: the runs of each policy."""
        families = [
            Family(name, variant, down)
            for name, variants in policies
            for variant in variants
            for down in self.scale_down_windows
        ]
        if fixed:
            families.append(Family(FIXED, {}))
        results: dict[str, Best] = {name: Best() for name, _ in policies}
        if fixed:
            results[FIXED] = Best()
        for done, (family, runs) in enumerate(zip(families, self._run(families), strict=True), 1):
            results[family.policy].runs.extend(runs)
            if self.progress:
                note = f"\rsweep: {done}/{len(families)} families ({family.policy} done)"
                print(note.ljust(80), end="", file=sys.stderr, flush=True)
        return results

    def _run(self, families: list[Family]) -> Iterator[list[Run]]:
        """Each family's runs, in the order of ``families``."""
        if self.jobs <= 1:
            return map(self.family, families)
        return in_order(_worker_family, families, self.jobs, _start_worker, self)

    def family(self, family: Family) -> list[Run]:
        """The runs of one family, in the order its bisection made them."""
        if family.policy == FIXED:
            return self._bisect_replicas()
        config = replace(self.config, hpa=self.config.hpa.with_scale_down_window(family.scale_down_window))
        return self._bisect_headroom(family.policy, family.variant, family.scale_down_window, config)

    def _bisect_headroom(self, name: str, variant: Variant, down: float, config: SimConfig) -> list[Run]:
        runs: list[Run] = []
        cache: dict[float, Run] = {}

        def run(h: float) -> Run:
            h = round(h, 4)
            if h not in cache:
                summary = self.simulate(make(name, self.cal, h, variant), config)
                settings = {**variant, "headroom": f"{h:g}", "scaleDownWindow": f"{down:g}"}
                cache[h] = Run(name, settings, summary["gpu_hours"], summary["slo_both"], summary)
                runs.append(cache[h])
            return cache[h]

        lo, hi = self.headroom_range
        for level in self.levels:
            top = hi
            while run(top).attainment < level and top < hi * MAX_WIDENING:
                wider = run(top * 2)
                if wider.gpu_hours <= run(top).gpu_hours * 1.01:
                    break  # the fleet no longer grows with headroom (maxReplicas): wider is no use
                top *= 2
            if run(top).attainment < level or run(lo).attainment >= level:
                continue  # not even at the top of the range, or already at its bottom
            a, b = math.log(lo), math.log(top)  # attainment(a) < level <= attainment(b)
            while b - a > RESOLUTION:
                mid = (a + b) / 2
                if run(math.exp(mid)).attainment >= level:
                    b = mid
                else:
                    a = mid
        return runs

    def _bisect_replicas(self) -> list[Run]:
        simulate_fixed = self.simulate_fixed
        if simulate_fixed is None:
            raise ValueError("a fixed deployment's search needs simulate_fixed")
        runs: list[Run] = []
        cache: dict[int, Run] = {}

        def run(n: int) -> Run:
            if n not in cache:
                summary = simulate_fixed(n)
                settings = {"replicas": str(n)}
                cache[n] = Run(FIXED, settings, summary["gpu_hours"], summary["slo_both"], summary)
                runs.append(cache[n])
            return cache[n]

        top = self.max_replicas
        for level in self.levels:
            if run(top).attainment < level:
                continue
            lo, hi = 0, top  # attainment(lo) < level <= attainment(hi); 0 replicas serve nothing
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if run(mid).attainment >= level:
                    hi = mid
                else:
                    lo = mid
        return runs


# The search a worker process runs families of: set once, when the worker starts.
_worker: Search | None = None


def _start_worker(search: Search) -> None:
    global _worker
    _worker = replace(search, progress=False, jobs=1)


def _worker_family(family: Family) -> list[Run]:
    assert _worker is not None, "a worker runs families only after _start_worker"
    return _worker.family(family)
