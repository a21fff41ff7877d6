"""The discrete-event simulation of one Deployment under one scaling policy.

Events, in this order when they fall on the same instant: a pod's engine event (a prefill
or a sequence ends), a pod becoming ready, a request arriving, the once-a-second tick
(clients give up, sidecars flush, the policy observes, the timeline is sampled), the HPA
sync, the KEDA poll. Pods move in closed form between events (``tuning.replica``).

Routing (``SimConfig.routing``): how a request picks a ready pod. ``round-robin`` is a
Kubernetes Service (kube-proxy spreads connections without looking at load);
``least-requests`` picks the pod with the fewest requests outstanding (Envoy's or a
mesh's least-request balancing, the default); ``least-tokens`` picks the pod with the
fewest outstanding weighted tokens (prompts not yet prefilled plus the generation
estimated for every request not yet finished), as ``token-scaler gateway`` does. A
request that arrives while no pod is ready waits at the gateway (as with KEDA's HTTP
add-on interceptor) up to the same queue limit, and is routed when a pod becomes ready.
The gateway writes stream records as ``token-scaler gateway`` does (``token_scaler/record.py``):
a held request's arrival (its prompt and the default generation estimate) when it starts
waiting, taken back when it leaves the queue; that is how a workload at zero pods shows
demand and wakes.

Scaling down deletes starting pods first (newest first), then ready ones (newest first,
as a ReplicaSet does); a deleted ready pod stops receiving requests and finishes what it
holds, up to the termination grace period, and is paid for until it is gone.

GPU-hours are counted over a fixed horizon, the trace's duration plus a margin, for every
policy alike; requests still running at the horizon are followed to their end.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from scaler.series import Counters, Flushes, FlushRow, Gauges
from token_scaler.native import by_value
from token_scaler.record import GATEWAY, ModelCounts, Record
from tuning.hpa import Hpa, HpaSettings
from tuning.policies import Policy, Second
from tuning.replica import (
    DRAINING,
    DROPPED,
    GENERATION_ESTIMATE,
    GONE,
    READY,
    REJECTED,
    STARTING,
    Pod,
    ReplicaProfile,
    RequestLists,
    Requests,
)
from tuning.trace import Trace

_POD, _READY, _ARRIVAL, _TICK, _SYNC, _POLL = range(6)
_INFLIGHT = operator.attrgetter("inflight")
MODEL = "model"
ROUTINGS = ("least-requests", "round-robin", "least-tokens")


@dataclass(frozen=True)
class SimConfig:
    replica: ReplicaProfile = field(default_factory=ReplicaProfile)
    hpa: HpaSettings = field(default_factory=HpaSettings)
    initial_replicas: int | None = None  # ready at t=0; default max(1, min replicas)
    timeout_s: float = 60.0  # a client stops waiting for a slot after this long
    grace_s: float = 600.0  # terminationGracePeriodSeconds of a deleted pod
    margin_s: float = 120.0  # the horizon is the last arrival plus this
    routing: str = "least-requests"  # one of ROUTINGS
    # what a generated token weighs against a prompt token: ``least-tokens`` routing
    # and the weighted arrivals of the timeline
    generation_weight: float = 1.0
    # GPU-hours and SLOs count from here (a trace played with a warm-up: Trace.with_warm_up)
    measure_from_s: float = 0.0

    def __reduce__(self) -> tuple[type[SimConfig], tuple[Any, ...]]:
        return by_value(self)

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r}: expected one of {', '.join(ROUTINGS)}")


@dataclass
class RunResult:
    policy: str
    description: str
    requests: Requests
    horizon_s: float
    pod_seconds: float
    scale_ups: int
    scale_downs: int
    timeline: dict[str, npt.NDArray[np.float64]]
    syncs: dict[str, npt.NDArray[np.float64]]
    config: SimConfig


@dataclass
class _GatewayCounts:
    """What the gateway's record says for the second: held arrivals, taken back on leaving."""

    prompt: int = 0
    generation: int = 0
    requests: int = 0
    held_prompt: int = 0
    seq: int = 0

    def hold(self, prompt: int) -> None:
        self.prompt += prompt
        self.generation += GENERATION_ESTIMATE
        self.requests += 1
        self.held_prompt += prompt

    def release(self, prompt: int) -> None:
        self.prompt -= prompt
        self.generation -= GENERATION_ESTIMATE
        self.requests -= 1
        self.held_prompt -= prompt

    def take(self, s: int, held: int) -> Record | None:
        if not (self.prompt or self.generation or self.requests or held):
            return None
        counts = ModelCounts(
            0,
            0,
            self.prompt,
            self.generation,
            0,
            held,
            held,
            self.held_prompt,
            held * GENERATION_ESTIMATE,
            self.requests,
        )
        self.seq += 1
        self.prompt = self.generation = self.requests = 0
        return Record("gateway", self.seq, s * 1000, 1000, {MODEL: counts}, role=GATEWAY)


def _totals(rows: list[FlushRow]) -> dict[str, Counters]:
    """The six counters of ``rows`` summed (integers: exact in any order)."""
    if not rows:
        return {}
    sp = sg = ap = ag = rq = ar = 0
    for row in rows:
        sp += row[0]
        sg += row[1]
        ap += row[2]
        ag += row[3]
        rq += row[4]
        ar += row[9]
    return {MODEL: (sp, sg, ap, ag, rq, ar)}


TIMELINE = (
    "t",
    "pods",
    "ready",
    "queue",
    "in_flight",
    "arrived_tokens",
    "arrived_weighted",
    "served_tokens",
)


@dataclass(frozen=True)
class _Arrivals:
    """What arrives in each second, from the trace alone: ``requests[s]``, ``tokens[s]`` and
    ``weighted[s]`` for the tick at ``s`` (arrivals in ``(s - 1, s]``; the first tick also
    takes those at 0). ``bincount`` adds each second's weights in arrival order, as a
    running sum would."""

    requests: list[int]
    tokens: list[int]
    weighted: list[float]

    @classmethod
    def of(cls, trace: Trace, generation_weight: float) -> _Arrivals:
        tick = np.maximum(np.ceil(trace.arrival_s), 1).astype(np.int64)
        size = int(tick[-1]) + 1 if len(tick) else 1
        tokens = trace.prompt + trace.generated
        weighted = trace.prompt + generation_weight * trace.generated
        return cls(
            np.bincount(tick, minlength=size).tolist(),
            np.bincount(tick, weights=tokens, minlength=size).astype(np.int64).tolist(),
            np.bincount(tick, weights=weighted, minlength=size).tolist(),
        )


class _Sim:
    def __init__(self, trace: Trace, policy: Policy, config: SimConfig) -> None:
        self.trace = trace
        self.policy = policy
        self.cfg = config
        self.p = config.replica
        self.r = RequestLists(trace.arrival_s, trace.prompt, trace.generated)
        self.arrivals = _Arrivals.of(trace, config.generation_weight)
        self.hpa = Hpa(config.hpa)
        self.horizon = math.ceil(trace.duration_s + config.margin_s)
        self.heap: list[tuple[float, int, int, Pod | None, int]] = []
        self.seq = 0
        self.pods: list[Pod] = []
        self.live: list[Pod] = []  # starting, ready, draining
        self.ready: list[Pod] = []  # in creation order (every pod takes the same cold start)
        self.just_gone: list[Pod] = []
        self.holding: deque[int] = deque()
        self.gateway = _GatewayCounts()
        self.scale_ups = self.scale_downs = 0
        self.last_active = 0.0
        self.cached_value = 0.0
        self.next_pod = 0  # round-robin position
        self.timeline: list[float] = []  # a row of TIMELINE a second, one after the other
        self.syncs: dict[str, list[float]] = {k: [] for k in ("t", "value", "desired", "current")}

    # -- events ------------------------------------------------------------------------

    def _push(self, t: float, kind: int, pod: Pod | None = None, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, pod, version))

    def _schedule(self, pod: Pod, when: float) -> None:
        """The pod's next event is at ``when`` (inf: none); any earlier one is void."""
        pod.version += 1
        if when < math.inf:
            self.seq += 1
            heapq.heappush(self.heap, (when, _POD, self.seq, pod, pod.version))

    def run(self) -> RunResult:
        initial = self.cfg.initial_replicas
        if initial is None:
            initial = max(1, self.cfg.hpa.min_replicas)
        for _ in range(initial):
            self._make_ready(self._new_pod(0.0), 0.0)
        self._push(1.0, _TICK)
        self._push(self.cfg.hpa.sync_s, _SYNC)
        self._push(self.cfg.hpa.polling_s, _POLL)
        heap = self.heap
        heappop, heappush = heapq.heappop, heapq.heappush
        arrival = self.r.arrival
        n = len(arrival)
        i = 0
        upcoming = arrival[0] if n else math.inf  # the next arrival's time
        arrive = self._arrive
        while heap:
            t, kind, _, pod, version = heap[0]
            if upcoming < t or (upcoming == t and kind > _ARRIVAL):
                arrive(i, upcoming)
                i += 1
                upcoming = arrival[i] if i < n else math.inf
                continue
            heappop(heap)
            if kind == _POD:
                assert pod is not None
                if version == pod.version:
                    when = pod.wake(t)
                    if pod.state == DRAINING and not pod.inflight:
                        self._gone(pod, t)
                    # _schedule, inline: the pod's one live event
                    pod.version = version = pod.version + 1
                    if when < math.inf:
                        self.seq += 1
                        heappush(heap, (when, _POD, self.seq, pod, version))
            elif kind == _READY:
                assert pod is not None
                if pod.state == STARTING:
                    self._make_ready(pod, t)
            elif kind == _TICK:
                if self._tick(int(t), i == n):
                    break
                self._push(t + 1.0, _TICK)
            elif kind == _SYNC:
                self._sync(t)
                self._push(t + self.cfg.hpa.sync_s, _SYNC)
            elif kind == _POLL:
                self._poll(t)
                self._push(t + self.cfg.hpa.polling_s, _POLL)
        return self._result()

    def _arrive(self, i: int, t: float) -> None:
        if not self.ready:
            if len(self.holding) >= self.p.max_queue:
                self.r.end(i, REJECTED, t)
            else:
                self.holding.append(i)
                self.gateway.hold(self.r.prompt[i])
            return
        self._route(i, t)

    def _pick(self) -> Pod:
        """The ready pod the routing sends the next request to (ties: the oldest pod)."""
        ready = self.ready
        routing = self.cfg.routing
        if len(ready) == 1 and routing != "round-robin":
            return ready[0]
        if routing == "round-robin":
            self.next_pod += 1
            return ready[self.next_pod % len(ready)]
        if routing == "least-tokens":
            gw = self.cfg.generation_weight
            return min(ready, key=lambda p: (p.bp + gw * p.bg, p.order))
        return min(ready, key=_INFLIGHT)  # the first of the fewest: ``ready`` is in creation order

    def _route(self, i: int, t: float) -> None:
        pod = self._pick()
        if len(pod.queue) >= self.p.max_queue:
            self.r.end(i, REJECTED, t)
            return
        if pod.arrive(i, t):
            self._schedule(pod, pod.next_event())

    def _tick(self, s: int, all_arrived: bool) -> bool:
        """The once-a-second work, in one pass over the pods: queued clients past the timeout
        give up, a draining pod past its grace period dies, every running sidecar flushes
        (the pods gone since the last second last), the timeline counts; then the gateway
        and the policy. True: the run is over."""
        t = float(s)
        timeout = self.cfg.timeout_s
        keep = self.policy.needs_records
        pods = queue = inflight = 0
        flushing: list[Pod] = []  # the running sidecars, then those gone since the last second
        for pod in list(self.live):  # a pod past its grace period leaves ``live``
            if pod.state == STARTING:
                pods += 1
                continue
            if pod.queue:
                pod.expire(t, timeout)
            if pod.state == DRAINING:
                if t >= pod.drain_deadline:
                    pod.advance(t)
                    pod.kill(t)
                    self._gone(pod, t)
                    continue
            else:
                pods += 1
            queue += len(pod.queue)
            inflight += pod.inflight
            flushing.append(pod)
        flushing += self.just_gone
        flushes, served_p, served_g = self._flush(flushing, s, keep)
        self.just_gone = []
        if self.holding:
            self._give_up_held(t)
        records: list[Record] = []
        if keep:
            gateway = self.gateway.take(s, len(self.holding))
            if gateway is not None:
                records.append(gateway)
        a = self.arrivals
        arrivals, tokens, weighted = (
            (a.requests[s], a.tokens[s], a.weighted[s]) if s < len(a.requests) else (0, 0, 0.0)
        )
        self.policy.observe(Second(s, arrivals, served_p, served_g, records, flushes))
        held = len(self.holding)
        row = (t, pods, len(self.ready), queue + held, inflight + held, tokens, weighted, served_p + served_g)
        self.timeline.extend(row)
        if all_arrived and t >= self.horizon:
            return self.r.ended == len(self.r.arrival) or t >= self.horizon + 3600
        return False

    @staticmethod
    def _flush(pods: list[Pod], s: int, keep: bool) -> tuple[Flushes | None, float, float]:
        """The sidecars of ``pods`` flush at second ``s``: their records as
        ``scaler.series.Flushes`` takes them (when ``keep``, and any pod flushed), and the
        prompt and generated tokens they served in the second."""
        t = float(s)
        # each sidecar's (name, seq, gauges), and the counts of those that have any
        sidecars: list[tuple[str, int, dict[str, Gauges]]] = []
        rows: list[FlushRow] = []
        served_p = served_g = 0.0
        for pod in pods:
            counts = None
            if not pod.quiet:  # a quiet pod's flush says nothing, and it served nothing
                counts, sp, sg = pod.take(t, keep)
                served_p += sp
                served_g += sg
            if keep:
                pod.seq += 1
                sidecars.append((pod.name, pod.seq, {} if counts is None else {MODEL: counts[5:9]}))
                if counts is not None:
                    rows.append(counts)
        flushes = Flushes(s, sidecars, _totals(rows)) if sidecars else None
        return flushes, served_p, served_g

    def _give_up_held(self, t: float) -> None:
        """Requests held at the gateway past the timeout are dropped."""
        r, timeout = self.r, self.cfg.timeout_s
        while self.holding and t - r.arrival[self.holding[0]] >= timeout:
            j = self.holding.popleft()
            self.gateway.release(r.prompt[j])
            r.end(j, DROPPED, t)

    def _in_flight(self) -> int:
        return sum(p.inflight for p in self.live) + len(self.holding)

    def _current(self) -> list[Pod]:
        return [p for p in self.live if p.state in (STARTING, READY)]

    def _sync(self, t: float) -> None:
        current = len(self._current())
        if self.cfg.hpa.use_cached_metrics:
            value = self.cached_value
        else:
            value = self.policy.value(t, self._in_flight())
        desired = self.hpa.sync(t, current, value, self.policy.target)
        s = self.syncs
        s["t"].append(t)
        s["value"].append(value)
        s["desired"].append(desired)
        s["current"].append(current)
        self._scale_to(desired, t)

    def _poll(self, t: float) -> None:
        in_flight = self._in_flight()
        if self.cfg.hpa.use_cached_metrics:
            self.cached_value = self.policy.value(t, in_flight)
        current = len(self._current())
        if current > 0 and self.cfg.hpa.min_replicas > 0:
            return  # KEDA's activation moves a workload only from or to zero replicas
        active = self.policy.active(t, in_flight)
        if active:
            self.last_active = t
        if current == 0 and active:
            self._scale_to(max(1, self.cfg.hpa.min_replicas), t)
        elif (
            current > 0
            and self.cfg.hpa.min_replicas == 0
            and not active
            and t - self.last_active >= self.cfg.hpa.cooldown_s
        ):
            self._scale_to(0, t)

    # -- pods --------------------------------------------------------------------------

    def _new_pod(self, t: float) -> Pod:
        pod = Pod(f"pod-{len(self.pods)}", len(self.pods), self.p, self.r, t)
        # A new sidecar seeds its generation estimate from the workload's stream
        # (sidecar.flush.recent_generation_means): here, the running pods' means.
        means = [p.mean_generation for p in self.live if p.mean_generation is not None]
        if means:
            pod.mean_generation = sum(means) / len(means)
        self.pods.append(pod)
        self.live.append(pod)
        return pod

    def _make_ready(self, pod: Pod, t: float) -> None:
        pod.state = READY
        pod.ready_at = t
        pod.t = t
        self.ready.append(pod)
        while self.holding:
            i = self.holding.popleft()
            self.gateway.release(int(self.r.prompt[i]))
            self._route(i, t)

    def _gone(self, pod: Pod, t: float) -> None:
        pod.state = GONE
        pod.gone_at = t
        self.live.remove(pod)
        self.just_gone.append(pod)
        pod.version += 1

    def _scale_to(self, desired: int, t: float) -> None:
        current = self._current()
        if desired > len(current):
            self.scale_ups += 1
            for _ in range(desired - len(current)):
                pod = self._new_pod(t)
                self._push(t + self.p.cold_start_s, _READY, pod)
        elif desired < len(current):
            self.scale_downs += 1
            starting = sorted((p for p in current if p.state == STARTING), key=lambda p: -p.created)
            ready = sorted((p for p in current if p.state == READY), key=lambda p: -p.ready_at)
            for pod in (starting + ready)[: len(current) - desired]:
                if pod.state == STARTING:
                    pod.state = GONE
                    pod.gone_at = t
                    self.live.remove(pod)
                    continue
                self.ready.remove(pod)
                pod.advance(t)
                pod.state = DRAINING
                pod.drain_deadline = t + self.cfg.grace_s
                if pod.idle:
                    self._gone(pod, t)

    def _result(self) -> RunResult:
        horizon = float(self.horizon)
        start = self.cfg.measure_from_s
        pod_seconds = sum(
            max(0.0, min(p.gone_at, horizon) - max(min(p.created, horizon), start)) for p in self.pods
        )
        rows = np.array(self.timeline, dtype=np.float64).reshape(-1, len(TIMELINE))
        return RunResult(
            self.policy.name,
            self.policy.describe(),
            self.r.to_requests(),
            horizon,
            pod_seconds,
            self.scale_ups,
            self.scale_downs,
            {k: rows[:, j].copy() for j, k in enumerate(TIMELINE)},
            {k: np.asarray(v, dtype=np.float64) for k, v in self.syncs.items()},
            self.cfg,
        )


def simulate(trace: Trace, policy: Policy, config: SimConfig) -> RunResult:
    """Replay ``trace`` through a Deployment scaled by ``policy``; deterministic."""
    if not len(trace):
        raise ValueError("the trace has no requests")
    return _Sim(trace, policy, config).run()
