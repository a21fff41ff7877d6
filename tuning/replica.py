"""The model of one replica (a model-server pod with its sidecar), fluid between events.

An engine step (one iteration of a continuous-batching server such as vLLM with chunked
prefill) takes ``step_base_s + step_per_seq_s * n + chunk / prefill_tokens_per_s``
seconds, where ``n`` sequences are decoding (each gains one token) and ``chunk`` prompt
tokens are prefilled: ``chunk_tokens - n`` while any prompt is waiting, else 0. Prompts
are prefilled first come, first served; the token that ends a prefill is the first
generated token. At most ``max_concurrency`` requests hold a slot (prefilling or
decoding); the rest wait in the pod's queue, up to ``max_queue``, and a request that
finds every queue full is rejected (HTTP 429/503).

Between events the rates are constant, so the model moves in closed form from event to
event (a prefill ends, a sequence ends) instead of in fixed time steps: ``clock`` is the
number of tokens every decoding sequence has received, and a sequence ends when the
clock reaches the value it was given when it started decoding. A pod is moved only when
something changes its rates or is read from it: a request joining behind a prompt being
prefilled changes neither, and the sidecar's once-a-second flush finds the generated
tokens at the second in closed form. ``tests/tuning/test_replica_model.py`` checks the pod
against a plain reference that moves every request at every event and arrival.

Defaults (``ReplicaProfile()``) are ASSUMPTIONS for an 8B-class model on one mid-range
GPU, not measurements: 25 ms per step + 0.5 ms per decoding sequence (about 40 tokens/s
for one stream, 780 tokens/s at 32 sequences), 6,000 prompt tokens/s, 2,048-token
chunks, 32 concurrent sequences, a 512-request queue, 120 s cold start (pod scheduling,
image pull, model load), $2.50 per replica-hour. ``token-scaler profile`` measures the
first four of a real server and writes a file that ``simulate --replica-profile`` reads.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from scaler.series import FlushRow
from sidecar.meter import DEFAULT_EWMA_ALPHA, DEFAULT_GENERATION_ESTIMATE
from token_scaler.native import by_value
from tuning.errors import ProfileFileError

PROFILE_KIND = "token-scaler/replica-profile"
PROFILE_VERSION = 1
# The sidecar's estimate of generated tokens before it has seen a request end, and the
# weight of the newest request in its running mean: the sidecar's own constants.
GENERATION_ESTIMATE = DEFAULT_GENERATION_ESTIMATE
ESTIMATE_ALPHA = DEFAULT_EWMA_ALPHA
_EPS = 1e-6

# Request status codes in the simulation's per-request arrays.
PENDING, DONE, REJECTED, DROPPED = 0, 1, 2, 3
# Pod states.
STARTING, READY, DRAINING, GONE = "starting", "ready", "draining", "gone"


@dataclass(frozen=True)
class ReplicaProfile:
    step_base_s: float = 0.025
    step_per_seq_s: float = 0.0005
    prefill_tokens_per_s: float = 6000.0
    chunk_tokens: int = 2048
    max_concurrency: int = 32
    max_queue: int = 512
    # KV-cache capacity in tokens (None: only max_concurrency limits the batch). A request
    # is admitted when its prompt and generation fit beside those running, as a server
    # that reserves a sequence's whole context at admission does.
    kv_cache_tokens: int | None = None
    cold_start_s: float = 120.0
    price_per_hour: float = 2.5
    gpus_per_replica: int = 1
    # What ``profile`` recommends for the ScaledObject (None: derive from the model).
    tokens_per_second_per_replica: float | None = None
    prompt_weight: float | None = None
    generation_weight: float | None = None
    source: str = "assumed defaults (no --replica-profile)"

    def __post_init__(self) -> None:
        for name in ("step_base_s", "prefill_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0")
        if self.step_per_seq_s < 0 or self.cold_start_s < 0 or self.price_per_hour < 0:
            raise ValueError("step_per_seq_s, cold_start_s and price_per_hour cannot be negative")
        if self.max_concurrency < 1 or self.chunk_tokens <= self.max_concurrency or self.max_queue < 0:
            raise ValueError("need max_concurrency >= 1, chunk_tokens > max_concurrency, max_queue >= 0")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must be at least 1 (or absent: no limit)")

    def __reduce__(self) -> tuple[type[ReplicaProfile], tuple[Any, ...]]:
        return by_value(self)

    def step_s(self, decoding: int, prefilling: bool) -> float:
        chunk = self.chunk_tokens - decoding if prefilling else 0
        return self.step_base_s + self.step_per_seq_s * decoding + chunk / self.prefill_tokens_per_s

    def decode_tokens_per_s(self, decoding: int) -> float:
        """Generated tokens/s of the whole pod with ``decoding`` sequences and no prompt waiting."""
        return decoding / self.step_s(decoding, False) if decoding else 0.0

    def suggested_weights(self) -> tuple[float, float]:
        """promptWeight 1 and generationWeight = what a generated token costs in prompt tokens,
        at the margin: the step time one more decoding sequence adds (``step_per_seq_s``) in
        units of a prompt token's prefill time. The fixed part of a step (``step_base_s``) is
        paid once per step however many tokens share it, so it is no generated token's cost: a
        replica's capacity is the rate at which its tokens lengthen the steps. (The average
        cost at a full batch, base included, counts that fixed part again with each token: for
        the default model 7.69 instead of 3, and scaling on it over-reacts to generation-heavy
        traffic; replays of synthesized days with a shifting mix reached 90 % of requests
        within the SLOs with 4 % fewer GPU-hours at 3 than at 7.69.)"""
        return 1.0, round(self.step_per_seq_s * self.prefill_tokens_per_s, 2)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "profile") -> ReplicaProfile:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ProfileFileError(f"{where}: {exc}") from None


def load_profile(path: str | Path) -> ReplicaProfile:
    """Read the file ``token-scaler profile`` writes (its ``replica`` and ``recommendation``)."""
    name = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ProfileFileError(f"{name}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ProfileFileError(f"{name}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
        raise ProfileFileError(f'{name}: not a replica profile (expected "kind": "{PROFILE_KIND}")')
    if data.get("version") != PROFILE_VERSION:
        raise ProfileFileError(f"{name}: profile version {data.get('version')!r}; this reader knows 1")
    replica = data.get("replica")
    if not isinstance(replica, dict):
        raise ProfileFileError(f'{name}: no "replica" object')
    values = dict(replica)
    rec = data.get("recommendation") or {}
    if isinstance(rec, dict):
        values["tokens_per_second_per_replica"] = rec.get("tokensPerSecondPerReplica")
        values["prompt_weight"] = rec.get("promptWeight")
        values["generation_weight"] = rec.get("generationWeight")
    values["source"] = f"{name} ({data.get('model', '?')} at {data.get('url', '?')})"
    return ReplicaProfile.from_json(values, name)


@dataclass
class Requests:
    """Per-request inputs and outcomes of one run, as arrays (what ``summarize`` reads)."""

    arrival: npt.NDArray[np.float64]
    prompt: npt.NDArray[np.int64]
    generated: npt.NDArray[np.int64]
    first_token: npt.NDArray[np.float64]
    finish: npt.NDArray[np.float64]
    status: npt.NDArray[np.int8]
    estimate: npt.NDArray[np.int64]  # the sidecar's estimate of generated tokens at arrival
    started: npt.NDArray[np.float64]  # decode clock of its pod when it began decoding

    @classmethod
    def of(cls, arrival: Any, prompt: Any, generated: Any) -> Requests:
        n = len(arrival)
        return cls(
            np.asarray(arrival, dtype=np.float64),
            np.asarray(prompt, dtype=np.int64),
            np.asarray(generated, dtype=np.int64),
            np.full(n, np.nan),
            np.full(n, np.nan),
            np.zeros(n, dtype=np.int8),
            np.zeros(n, dtype=np.int64),
            np.zeros(n),
        )


class RequestLists:
    """The same per-request fields as Python lists, read and written while a run goes on:
    an element of a list costs a fraction of a numpy element to read or set, and its
    numbers are Python ints and floats (the same values, faster arithmetic).
    ``to_requests`` makes the arrays when the run ends."""

    __slots__ = (
        "arrival",
        "context",
        "ended",
        "estimate",
        "finish",
        "first_token",
        "generated",
        "prompt",
        "started",
        "status",
    )

    def __init__(self, arrival: Any, prompt: Any, generated: Any) -> None:
        self.arrival: list[float] = np.asarray(arrival, dtype=np.float64).tolist()
        self.prompt: list[int] = np.asarray(prompt, dtype=np.int64).tolist()
        self.generated: list[int] = np.asarray(generated, dtype=np.int64).tolist()
        # prompt + generated: what a request reserves of a KV cache
        self.context: list[int] = [p + g for p, g in zip(self.prompt, self.generated, strict=True)]
        n = len(self.arrival)
        self.first_token: list[float] = [math.nan] * n
        self.finish: list[float] = [math.nan] * n
        self.status: list[int] = [PENDING] * n
        self.estimate: list[int] = [0] * n
        self.started: list[float] = [0.0] * n
        self.ended = 0  # requests no longer PENDING

    def end(self, i: int, status: int, t: float) -> None:
        """Request ``i`` leaves the system at ``t``: rejected or dropped (DONE: ``Pod._finish``)."""
        self.status[i] = status
        self.finish[i] = t
        self.ended += 1

    def to_requests(self) -> Requests:
        return Requests(
            np.array(self.arrival, dtype=np.float64),
            np.array(self.prompt, dtype=np.int64),
            np.array(self.generated, dtype=np.int64),
            np.array(self.first_token, dtype=np.float64),
            np.array(self.finish, dtype=np.float64),
            np.array(self.status, dtype=np.int8),
            np.array(self.estimate, dtype=np.int64),
            np.array(self.started, dtype=np.float64),
        )


class Pod:
    """One replica: engine state plus what its sidecar has counted since the last flush.

    The engine's rates depend only on how many sequences decode and whether a prompt is
    waiting; they are kept (``step``, ``prefill_rate``) and looked up again when the batch
    changes, so moving the pod between events is a few multiplications.

    ``bp`` and ``bg`` are the backlog the sidecar reports, and what a token-aware router
    weighs: prompt tokens not yet prefilled, and the estimated generation of every request
    not yet finished."""

    __slots__ = (
        "ag",
        "ap",
        "ar",
        "bg",
        "bp",
        "clock",
        "created",
        "decoding",
        "drain_deadline",
        "gone_at",
        "head_left",
        "inflight",
        "kv_used",
        "mean_generation",
        "name",
        "order",
        "p",
        "prefill",
        "prefill_rate",
        "queue",
        "quiet",
        "r",
        "rates",
        "ready_at",
        "rq",
        "seq",
        "sg_sent",
        "sg_total",
        "sp",
        "state",
        "step",
        "t",
        "version",
        "waiting",
    )

    def __init__(
        self, name: str, order: int, profile: ReplicaProfile, requests: RequestLists, now: float
    ) -> None:
        self.name = name
        self.order = order
        self.p = profile
        self.r = requests
        self.rates = rate_table(profile)
        self.state = STARTING
        self.created = now
        self.ready_at = math.inf
        self.gone_at = math.inf
        self.drain_deadline = math.inf
        self.t = now
        self.version = 0
        self.queue: deque[int] = deque()
        self.prefill: deque[int] = deque()
        self.head_left = 0.0  # prompt tokens of the head prefill still to go
        self.decoding: list[tuple[float, int]] = []  # (clock at which it ends, request)
        self.clock = 0.0
        self.step = 0.0  # seconds per engine step with the current batch
        self.prefill_rate = 0.0  # prompt tokens/s of the head prefill with the current batch
        # sidecar counters (since the last flush) and gauges
        self.seq = 0
        self.sp = 0
        self.ap = 0
        self.ag = 0
        self.rq = 0
        self.ar = 0
        self.sg_total = 0.0  # generated tokens served since the pod started (fluid)
        self.sg_sent = 0
        self.inflight = 0  # requests queued, prefilling or decoding
        # the last flush had nothing to say and nothing has arrived since: nor has the next
        self.quiet = False
        self.waiting = 0
        self.bp = 0
        self.bg = 0
        self.mean_generation: float | None = None
        self.kv_used = 0  # context tokens reserved by admitted requests (with kv_cache_tokens)
        self._rates()

    @property
    def idle(self) -> bool:
        return not self.inflight

    def _rates(self) -> None:
        """The step time and prefill rate of the batch as it is now."""
        self.step, self.prefill_rate = self.rates[len(self.decoding)][bool(self.prefill)]

    def advance(self, t: float) -> None:
        """Let the engine run until ``t`` at the current rates (no event lies in between)."""
        dt = t - self.t
        if dt <= 0:
            return
        self.t = t
        n = len(self.decoding)
        if n:
            gained = dt / self.step
            self.clock += gained
            self.sg_total += n * gained
        if self.prefill:
            self.head_left -= self.prefill_rate * dt

    def next_event(self) -> float:
        """When the head prefill or the first sequence ends at the current rates (inf: idle)."""
        soonest = math.inf
        if self.prefill:
            left = self.head_left
            soonest = self.t + (left if left > 0.0 else 0.0) / self.prefill_rate
        if self.decoding:
            steps = self.decoding[0][0] - self.clock
            end = self.t + (steps if steps > 0.0 else 0.0) * self.step
            if end < soonest:
                soonest = end
        return soonest

    def wake(self, t: float) -> float:
        """At its event: move to ``t``, finish what is done, and say when the next event is."""
        self.advance(t)
        self.settle(t)
        return self.next_event()

    # -- what happens to requests (at ``t``: the caller moved the pod there first, but for
    # ``arrive``, which moves it when it has to) --------------------------------------

    def arrive(self, i: int, t: float) -> bool:
        """Request ``i`` arrives at ``t``. True when the batch may have changed (so the next
        event may have moved); False when it joins behind a prompt being prefilled, which
        changes no rate, so the pod is not even moved to ``t``."""
        r = self.r
        prompt = r.prompt[i]
        mean = self.mean_generation
        estimate = GENERATION_ESTIMATE if mean is None else round(mean)
        r.estimate[i] = estimate
        self.quiet = False
        self.ap += prompt
        self.ag += estimate
        self.ar += 1
        self.bp += prompt
        self.bg += estimate
        self.inflight += 1
        self.waiting += 1
        self.queue.append(i)
        if self.prefill:
            self._fill()
            return False
        self.advance(t)
        if self._fill():
            self.step, self.prefill_rate = self.rates[len(self.decoding)][True]
            if self.head_left <= _EPS:
                self.settle(t)
        return True

    def _fill(self) -> bool:
        """Move queued requests into free slots (the caller looks the rates up again);
        True when a prefill is waiting."""
        queue, prefill = self.queue, self.prefill
        if not queue:
            return bool(prefill)
        slots = self.p.max_concurrency - len(prefill) - len(self.decoding)
        if slots <= 0:
            return bool(prefill)
        limit = self.p.kv_cache_tokens
        while slots > 0 and queue:
            i = queue[0]
            if limit is not None:
                need = self.r.context[i]
                # a request larger than the whole cache runs alone rather than never
                if self.kv_used + need > limit and (prefill or self.decoding):
                    break
                self.kv_used += need
            queue.popleft()
            if not prefill:
                self.head_left = float(self.r.prompt[i])
            prefill.append(i)
            slots -= 1
        return bool(prefill)

    def settle(self, t: float) -> None:
        """Finish every prefill and sequence that is done at ``t``, then fill free slots
        (again while a prompt of no tokens comes to the head: it is done at once)."""
        r = self.r
        prefill, decoding = self.prefill, self.decoding
        changed = False
        while True:
            while prefill and self.head_left <= _EPS:
                i = prefill.popleft()
                self._first_token(i, t)
                if r.generated[i] <= 1:
                    self._finish(i, t)
                else:
                    r.started[i] = self.clock
                    heapq.heappush(decoding, (self.clock + float(r.generated[i] - 1), i))
                if prefill:
                    self.head_left = float(r.prompt[prefill[0]])
                changed = True
            # a sequence that starts decoding now ends a whole token later at the soonest
            while decoding and decoding[0][0] - self.clock <= _EPS:
                self._finish(heapq.heappop(decoding)[1], t)
                changed = True
            if not changed:
                return
            if self.queue:
                self._fill()
            if not (prefill and self.head_left <= _EPS):
                break
        self.step, self.prefill_rate = self.rates[len(decoding)][bool(prefill)]

    def _first_token(self, i: int, t: float) -> None:
        r = self.r
        prompt = r.prompt[i]
        # a fluid prefill of a tiny prompt would take less than the one step it needs
        floor = r.arrival[i] + self.p.step_base_s
        r.first_token[i] = t if t >= floor else floor
        self.sp += prompt
        if r.generated[i] > 0:
            self.sg_total += 1.0
        self.waiting -= 1
        self.bp -= prompt

    def _finish(self, i: int, t: float) -> None:
        r = self.r
        generated = r.generated[i]
        first = r.first_token[i]
        r.finish[i] = t if t >= first else first
        r.status[i] = DONE
        r.ended += 1
        estimate = r.estimate[i]
        self.ag += generated - estimate
        self.bg -= estimate
        if self.p.kv_cache_tokens is not None:
            self.kv_used -= r.context[i]
        self.rq += 1
        self.inflight -= 1
        mean = self.mean_generation
        self.mean_generation = generated if mean is None else mean + ESTIMATE_ALPHA * (generated - mean)

    def _release(self, i: int) -> None:
        if self.p.kv_cache_tokens is not None:
            self.kv_used -= self.r.context[i]

    def expire(self, t: float, timeout_s: float) -> list[int]:
        """Clients stop waiting: queued requests older than ``timeout_s`` are dropped."""
        dropped = []
        arrival = self.r.arrival
        while self.queue and t - arrival[self.queue[0]] >= timeout_s:
            dropped.append(self.queue.popleft())
        for i in dropped:
            self._abort_waiting(i, t)
        return dropped

    def _abort_waiting(self, i: int, t: float) -> None:
        r = self.r
        prompt, estimate = r.prompt[i], r.estimate[i]
        r.end(i, DROPPED, t)
        self.ap -= prompt
        self.ag -= estimate
        self.bp -= prompt
        self.bg -= estimate
        self.waiting -= 1
        self.inflight -= 1
        self.rq += 1

    def kill(self, t: float) -> list[int]:
        """The grace period ran out: every request still on the pod is dropped."""
        r = self.r
        lost = list(self.queue) + list(self.prefill) + [i for _, i in self.decoding]
        for i in self.queue:
            self._abort_waiting(i, t)
        for i in self.prefill:
            self._release(i)
            self._abort_waiting(i, t)
        for _, i in self.decoding:
            self._release(i)
            served = 1 + int(self.clock - r.started[i])
            r.end(i, DROPPED, t)
            estimate = r.estimate[i]
            self.ag += served - estimate
            self.bg -= estimate
            self.sg_total += served - 1 - (self.clock - r.started[i])
            self.inflight -= 1
            self.rq += 1
        self.queue.clear()
        self.prefill.clear()
        self.decoding.clear()
        self._rates()
        return lost

    def take(self, t: float, counts: bool = True) -> tuple[FlushRow | None, float, float]:
        """The sidecar's flush at ``t``: counts since the last one, ``ModelCounts``' fields in
        order (None when there is nothing to say, or not asked for), and the prompt and
        generated tokens served in the interval. The pod is not moved: its fluid generated
        tokens at ``t`` are found in closed form."""
        total = self.sg_total
        n = len(self.decoding)
        if n and t > self.t:
            total += n * ((t - self.t) / self.step)
        sg = round(total) - self.sg_sent
        self.sg_sent += sg
        row = None
        sp = self.sp
        self.quiet = not (sp or sg or self.ap or self.ag or self.rq or self.inflight)
        if counts and not self.quiet:
            row = (
                sp,
                sg,
                self.ap,
                self.ag,
                self.rq,
                self.inflight,
                self.waiting,
                max(self.bp, 0),
                max(self.bg, 0),
                self.ar,
            )
        self.sp = self.ap = self.ag = self.rq = self.ar = 0
        return row, float(sp), float(sg)


@functools.cache
def rate_table(profile: ReplicaProfile) -> tuple[tuple[tuple[float, float], ...], ...]:
    """``[n][prefilling]``: the step time and the head prompt's prefill rate (tokens/s) with
    ``n`` sequences decoding, with and without a prompt waiting."""
    return tuple(
        tuple(
            (profile.step_s(n, prefilling), (profile.chunk_tokens - n) / profile.step_s(n, prefilling))
            for prefilling in (False, True)
        )
        for n in range(profile.max_concurrency + 1)
    )


def saturated_throughput(
    profile: ReplicaProfile, prompt: Any, generated: Any, requests: int = 2000
) -> tuple[float, float]:
    """Prompt and generated tokens/s one replica serves with a queue that never empties,
    for requests shaped like ``prompt``/``generated`` (cycled): measured on the model itself."""
    prompt = np.asarray(prompt, dtype=np.int64)
    generated = np.asarray(generated, dtype=np.int64)
    index = np.arange(requests) % len(prompt)
    reqs = RequestLists(np.zeros(requests), prompt[index], generated[index])
    pod = Pod("probe", 0, replace(profile, max_queue=requests), reqs, 0.0)
    pod.state = READY
    for i in range(requests):
        pod.arrive(i, 0.0)
    # measure between the first and the third quarter of requests ended, away from the
    # start (empty batch) and the end (the queue running dry)
    start: tuple[float, float, float] | None = None
    while not pod.idle:
        t = pod.next_event()
        pod.advance(t)
        pod.settle(t)
        if start is None and pod.rq >= requests // 4:
            start = (t, float(pod.sp), pod.sg_total)
        if start is not None and pod.rq >= 3 * requests // 4 and t > start[0]:
            return (pod.sp - start[1]) / (t - start[0]), (pod.sg_total - start[2]) / (t - start[0])
    return 0.0, 0.0
