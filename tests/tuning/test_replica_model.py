"""The replica model in closed form (``tuning.replica.Pod``) against a plain reference.

The reference keeps, for every request in the batch, what it has left (prompt tokens for
the head prefill, tokens to generate for a decoding sequence), finds the next event as the
soonest of them to run out, and moves every request by the same rates up to it, at every
arrival too. The pod keeps a decode clock and a heap instead, moves only when a rate
changes, and leaves the pod unmoved when a request joins behind a prompt being prefilled.
Both must give every request the same first-token and finish times.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tuning.replica import READY, Pod, ReplicaProfile, RequestLists

EPS = 1e-6  # the model's tolerance: what is this close to done is done


@dataclass
class Case:
    profile: ReplicaProfile
    arrival: list[float]
    prompt: list[int]
    generated: list[int]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    slots = draw(st.integers(1, 4))
    profile = ReplicaProfile(
        step_base_s=draw(st.floats(0.005, 0.05)),
        step_per_seq_s=draw(st.floats(0.0, 0.002)),
        prefill_tokens_per_s=draw(st.floats(500.0, 10000.0)),
        chunk_tokens=draw(st.integers(slots + 1, 4096)),
        max_concurrency=slots,
        max_queue=100,
        kv_cache_tokens=draw(st.none() | st.integers(50, 5000)),
    )
    n = draw(st.integers(1, 12))
    gaps = draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n))
    arrival = [sum(gaps[: k + 1]) for k in range(n)]
    prompt = draw(st.lists(st.integers(0, 3000), min_size=n, max_size=n))
    generated = draw(st.lists(st.integers(0, 80), min_size=n, max_size=n))
    return Case(profile, arrival, prompt, generated)


class Reference:
    """The same model, stepped plainly from event to event."""

    def __init__(self, case: Case) -> None:
        self.c = case
        self.p = case.profile
        n = len(case.arrival)
        self.first_token = [math.nan] * n
        self.finish = [math.nan] * n
        self.queue: deque[int] = deque()
        self.prefill: deque[int] = deque()
        self.head_left = 0.0
        self.left: dict[int, float] = {}  # decoding request -> tokens still to generate
        self.kv = 0
        self.now = 0.0

    def _step(self) -> float:
        return self.p.step_s(len(self.left), bool(self.prefill))

    def _next_event(self) -> float:
        step = self._step()
        soonest = math.inf
        if self.prefill:
            rate = (self.p.chunk_tokens - len(self.left)) / step
            soonest = self.now + max(self.head_left, 0.0) / rate
        if self.left:
            soonest = min(soonest, self.now + max(min(self.left.values()), 0.0) * step)
        return soonest

    def _move(self, t: float) -> None:
        step = self._step()
        dt = t - self.now
        if self.prefill:
            self.head_left -= (self.p.chunk_tokens - len(self.left)) / step * dt
        for i in self.left:
            self.left[i] -= dt / step
        self.now = t

    def _fill(self) -> None:
        limit = self.p.kv_cache_tokens
        while self.queue and len(self.prefill) + len(self.left) < self.p.max_concurrency:
            i = self.queue[0]
            need = self.c.prompt[i] + self.c.generated[i]
            if limit is not None and self.kv + need > limit and (self.prefill or self.left):
                break
            self.kv += need if limit is not None else 0
            self.queue.popleft()
            if not self.prefill:
                self.head_left = float(self.c.prompt[i])
            self.prefill.append(i)

    def _end(self, i: int, t: float) -> None:
        self.finish[i] = max(t, self.first_token[i])
        if self.p.kv_cache_tokens is not None:
            self.kv -= self.c.prompt[i] + self.c.generated[i]

    def _complete(self, t: float) -> None:
        while True:
            while self.prefill and self.head_left <= EPS:
                i = self.prefill.popleft()
                self.first_token[i] = max(t, self.c.arrival[i] + self.p.step_base_s)
                if self.c.generated[i] <= 1:
                    self._end(i, t)
                else:
                    self.left[i] = float(self.c.generated[i] - 1)
                if self.prefill:
                    self.head_left = float(self.c.prompt[self.prefill[0]])
            for i in [i for i, left in self.left.items() if left <= EPS]:
                del self.left[i]
                self._end(i, t)
            self._fill()
            if not (self.prefill and self.head_left <= EPS):
                return

    def run(self) -> tuple[list[float], list[float]]:
        arrival = self.c.arrival
        i = 0
        while i < len(arrival) or self.queue or self.prefill or self.left:
            t = self._next_event()
            if i < len(arrival) and arrival[i] < t:
                self._move(arrival[i])
                self.queue.append(i)
                self._fill()
                self._complete(arrival[i])
                i += 1
            else:
                self._move(t)
                self._complete(t)
        return self.first_token, self.finish


def run_pod(case: Case) -> tuple[list[float], list[float]]:
    """Drive a pod as the engine does: its event before an arrival at the same instant."""
    requests = RequestLists(case.arrival, case.prompt, case.generated)
    pod = Pod("pod-0", 0, case.profile, requests, 0.0)
    pod.state = READY
    i = 0
    while i < len(case.arrival) or not pod.idle:
        t = pod.next_event()
        if i < len(case.arrival) and case.arrival[i] < t:
            pod.arrive(i, case.arrival[i])
            i += 1
        else:
            pod.wake(t)
    return requests.first_token, requests.finish


def close(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_closed_form_pod_matches_the_stepped_reference(case: Case) -> None:
    first_pod, finish_pod = run_pod(case)
    first_ref, finish_ref = Reference(case).run()
    assert not any(math.isnan(x) for x in finish_pod)  # every request ran to its end
    assert close(first_pod, first_ref), (first_pod, first_ref)
    assert close(finish_pod, finish_ref), (finish_pod, finish_ref)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_a_flush_between_events_counts_as_moving_the_pod_would(case: Case) -> None:
    """The sidecar's flush finds the generated tokens at a tick in closed form; moving the
    pod to every tick first (which changes nothing else) counts the same tokens a second."""
    runs = []
    for move in (False, True):
        requests = RequestLists(case.arrival, case.prompt, case.generated)
        pod = Pod("pod-0", 0, case.profile, requests, 0.0)
        pod.state = READY
        i, tick, served = 0, 1.0, []
        while i < len(case.arrival) or not pod.idle:
            t = pod.next_event()
            soonest = min(t, case.arrival[i] if i < len(case.arrival) else math.inf)
            if tick <= soonest:
                if move:
                    pod.advance(tick)
                served.append(pod.take(tick, counts=False)[2])
                tick += 1.0
            elif i < len(case.arrival) and case.arrival[i] < t:
                pod.arrive(i, case.arrival[i])
                i += 1
            else:
                pod.wake(t)
        served.append(pod.take(tick, counts=False)[2])
        runs.append(served)
    assert runs[0] == runs[1]
    assert sum(runs[0]) == sum(g for g in case.generated)
