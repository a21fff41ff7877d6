"""Reservation chunks: a tenant's budget and rate reserved ahead, admitted from locally (pure).

Under load, the Redis round trip of every admission is most of what the policies add to a
request. A sidecar that sees a tenant (with a model, when a limit of that model applies) at
``reservationChunks.minRequestsPerSecond`` or more (over its last ``STEADY_GAPS`` gaps between
requests) reserves a chunk ahead, off the request path: an ordinary leased reservation
(``lua/admit.lua``) of about ``reservationChunks.seconds`` of that traffic, in budget and in
rate-limit tokens alike. The next requests draw their own
reservation (prompt estimate + max_tokens) from it with no round trip. When one ends, its
real usage is charged to the chunk; the chunk's state in Redis (what it still holds, what
was charged) is brought up to date by ``lua/checkpoint.lua`` in the writes that carry the
settlements, at most every ``CHECKPOINT_EVERY_S`` or ``CHECKPOINT_GAPS`` of its tenant's
usual gaps between requests, whichever is longer (a retired chunk's at once).

What keeps holding, and why:
- A budget is never passed by more than one request's reservation: a chunk is a
  reservation, granted atomically like any other, and requests draw within it.
- Near a limit chunks stop: a chunk is at most what is left of the budget, and a burst of
  each rate limit, divided by 4 x the sidecars of the scope; when that is less than two
  requests' worth no chunk is taken and every request reserves on its own, as without
  chunks. A rate limit that refuses a chunk holds chunks back for ``BACKOFF_S``.
- A request whose real usage passes its reservation (a prompt estimated short) takes the
  excess from the chunk's undrawn part, so a chunk's requests together stay within it.
- A sidecar that dies leaves its chunks to their leases like any reservation: what they
  held is refunded, what was charged stays. The requests that ended since its last
  checkpoint (at most a second's worth, or about ``CHECKPOINT_GAPS`` of a thin tenant's) are
  lost with it, as a request in flight is.
- Redis away: a chunk goes on admitting (it is reserved) until half its lease has passed
  since the last renewal Redis confirmed, well before another sidecar could release it;
  checkpoints wait and are sent when Redis answers (absolute states: the last one counts).
- Redis lost a chunk (a failover to a replica that missed it, a restart without
  persistence): a checkpoint finds neither it nor a trace of its closing. The chunk is
  retired and all that was charged to it is charged without a reservation, once (as a
  fail-open request is): replication keeps order, so a Redis without the grant has none of
  the checkpoints that followed it either.

A chunk is retired (no more draws) when it cannot take a request and has room for less than
two requests of the usual size, when it has been idle for ``seconds`` (thin traffic: for
``IDLE_SPANS`` times its tenant's last ``STEADY_GAPS`` gaps), after ``AGE_LIMIT`` chunk
lengths (thin traffic: ``AGE_SPANS`` times the time its requests take to draw it; its
successor is asked for at half that), when its entry closed (all drawn and ended), when the
policy is reloaded, or when a checkpoint finds it released or lost. Its unused part is
released with the checkpoint after its last request ends. Past its draw window (no renewal
confirmed) it is passed over, not retired: the next renewal lets it admit again.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from sidecar.policy import ratelimit
from sidecar.policy.tickets import Ticket

WINDOW_S = 1.0  # the time constant of the demand estimate (a busy tenant's changes seen fast)
# Whether a tenant is busy enough for chunks is told by the time its last STEADY_GAPS gaps
# between requests took: one request after a quiet minute is not a tenant at 1 request/s (it
# would take a chunk for itself), a tenant at 1 request/s does not look idle between its
# requests, and one coming back after a pause counts again after a few requests.
STEADY_GAPS = 4
BACKOFF_S = 1.0  # after a refused chunk, requests reserve alone this long
LOW_WATER = 0.5  # a new chunk is asked for when what is left falls below this share of one
AGE_LIMIT = 8  # chunk lengths after which a chunk is retired (what it holds comes back)
AGE_SPANS = 2  # ... or, for thin traffic, this many times the time its requests take to draw it
SHARE = 4  # a chunk takes at most 1 / (SHARE x sidecars) of what is left of a limit
MIN_REQUESTS = 8  # the smallest chunk asked for, in requests of the usual size
# A chunk's checkpoints are at least this far apart, and CHECKPOINT_GAPS of its tenant's usual
# gaps between requests (a retired one's go at once): each request would otherwise send one.
# It bounds what a sidecar killed outright loses: the requests that ended since (1 s of a busy
# tenant's, about 4 of a thin one's), as it loses those in flight with or without chunks.
CHECKPOINT_EVERY_S = 1.0
CHECKPOINT_GAPS = 4
# A chunk idle for IDLE_SPANS times the time its tenant's last STEADY_GAPS gaps took is retired
# (at least ``seconds``): at a steady rate (random arrivals) an idle gap that long comes by
# chance once in (1 + IDLE_SPANS) ** STEADY_GAPS = 256 gaps, where a multiple of an estimated
# rate would end thin tenants' chunks (and add a round trip) whenever the estimate ran high.
IDLE_SPANS = 3
MAX_KEYS = 100_000
# A key quiet this long is forgotten: its gaps no longer say it is busy (STEADY_GAPS over at
# least this long is below the lowest minRequestsPerSecond, 0.1).
FORGET_S = 60.0

Key = Hashable  # what a chunk is for: the tenant's Redis keys and limits (ahead.key_of)


@dataclass(slots=True)
class Demand:
    """Requests, cost and tokens per second at this sidecar (exponentially weighted), and
    the arrivals of its last few requests."""

    at: float
    requests: float = 0.0
    cost: float = 0.0
    tokens: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # the last STEADY_GAPS + 1

    def add(self, now: float, cost: int, tokens: int) -> None:
        self.decay(now)
        self.requests += 1 / WINDOW_S
        self.cost += cost / WINDOW_S
        self.tokens += tokens / WINDOW_S
        self.arrivals.append(now)
        if len(self.arrivals) > STEADY_GAPS + 1:
            del self.arrivals[0]

    def usual(self) -> tuple[float, float]:
        """The cost and tokens of a request, on average."""
        if self.requests <= 0:
            return 0.0, 0.0
        return self.cost / self.requests, self.tokens / self.requests

    def steady(self, now: float) -> float:
        """Requests per second over the last ``STEADY_GAPS`` gaps (until now: it falls when
        the requests stop), but no more than the recent rate where that is the better
        measure (a burst of requests at once is not a tenant at thousands a second); 0 before
        there are that many."""
        if len(self.arrivals) <= STEADY_GAPS or now <= self.arrivals[0]:
            return 0.0
        return min(STEADY_GAPS / (now - self.arrivals[0]), max(self.requests, STEADY_GAPS / WINDOW_S))

    def span(self) -> float:
        """The time its last ``STEADY_GAPS`` gaps took; 0 before there are that many."""
        if len(self.arrivals) <= STEADY_GAPS:
            return 0.0
        return self.arrivals[-1] - self.arrivals[0]

    def decay(self, now: float) -> None:
        if now > self.at:
            kept = math.exp(-(now - self.at) / WINDOW_S)
            self.requests *= kept
            self.cost *= kept
            self.tokens *= kept
            self.at = now


@dataclass(slots=True)
class Size:
    cost: int
    tokens: int
    least: int  # the smallest grant (cost) worth taking: two requests
    checkpoint_s: float  # its checkpoints this far apart
    age_s: float  # retired this long after its first draw


def size(
    demand: Demand,
    now: float,
    *,
    seconds: float,
    min_rps: float,
    budget_left: int | None,
    bursts: list[float],
    peers: int,
) -> Size | None:
    """How much to reserve ahead; None when the traffic is too thin or a limit too near.

    ``budget_left``: what the tenant has left (None: no budget); ``bursts``: each rate
    limit's burst, in tokens.
    """
    demand.decay(now)
    steady = demand.steady(now)
    if steady < min_rps:
        return None
    per_cost, per_tokens = demand.usual()
    # Thin traffic: a chunk of at least MIN_REQUESTS (a chunk per request or two would cost
    # about what it saves). Sized on the recent rate: the steady one lags when a tenant slows
    # down.
    requests = max(demand.requests * seconds, MIN_REQUESTS)
    cost, tokens = per_cost * requests, per_tokens * requests
    share = SHARE * max(1, peers)
    scale = 1.0
    if budget_left is not None and cost > 0:
        scale = min(scale, max(0, budget_left) / share / cost)
    for burst in bursts:
        if tokens > 0:
            scale = min(scale, burst / share / tokens)
    cost, tokens = cost * scale, tokens * scale
    if tokens < 2 * per_tokens or (per_cost > 0 and cost < 2 * per_cost):
        return None
    # Under a request a window the recent estimate says nothing (right after a request it is
    # at least one a second, whatever the tenant's pace): the steady one alone.
    rate = steady if steady < 1 / WINDOW_S else max(steady, demand.requests)
    checkpoint_s = max(CHECKPOINT_EVERY_S, CHECKPOINT_GAPS / rate)
    age_s = max(AGE_LIMIT * seconds, AGE_SPANS * requests * scale / rate)
    least = math.ceil(2 * per_cost - 1e-6)
    return Size(math.ceil(cost), math.ceil(tokens), least, checkpoint_s, age_s)


@dataclass(slots=True)
class Chunk:
    """A reservation requests draw from: its state here, and what Redis was last told."""

    ticket: Ticket  # its reservation: id, keys, intervals, budget, day, month
    cost: int  # granted
    tokens: int
    shown: list[tuple[ratelimit.Limit, float]]  # each limit and its reset (ms) when granted
    taken: float  # monotonic seconds
    used: float  # the last draw
    wide_counted: int  # tokens the model's limit across tenants holds for it
    until: float  # monotonic: no draw after this (half a lease after the last renewal)
    checkpoint_s: float = CHECKPOINT_EVERY_S  # its checkpoints at least this far apart
    age_s: float = 0.0  # retired this long after its first draw (0: AGE_LIMIT x ``seconds``)
    begun: float = -1.0  # monotonic: its first draw
    drawn_cost: int = 0
    drawn_tokens: int = 0
    ended_cost: int = 0  # the reservations of the draws that ended
    ended_tokens: int = 0
    real_cost: int = 0  # and their real usage: charged
    real_tokens: int = 0
    inflight: int = 0
    retired: bool = False
    seq: int = 0  # checkpoints sent
    dirty: bool = False  # its state changed since the last checkpoint
    sent_at: float = -math.inf  # monotonic: its last checkpoint
    closing_sent: bool = False  # a checkpoint holding nothing (it closes the entry) went out
    acked: tuple[int, int] = (0, 0)  # charged (cost, tokens) in the last checkpoint Redis took
    acked_seq: int = 0
    lost_seq: int = 0  # Redis lost it: the checkpoint whose charge was made without it
    lost_charged: tuple[int, int] = (0, 0)
    key: Key = None  # what it is for (set by ``Chunks.add``)

    def fits(self, cost: int, tokens: int, now: float) -> bool:
        return (
            not self.retired
            and now < self.until
            and self.drawn_cost + cost <= self.cost
            and self.drawn_tokens + tokens <= self.tokens
        )

    def age(self, now: float) -> float:
        """Since its first draw: a successor taken ahead waits its turn without ageing (one
        never drawn ends by idling)."""
        return now - self.begun if self.begun >= 0 else 0.0

    def ending(self, now: float) -> bool:
        """Past half its age: its successor is asked for (and retires it when granted)."""
        return bool(self.age_s) and self.age(now) >= self.age_s / 2

    def draw(self, cost: int, tokens: int, now: float) -> None:
        if self.begun < 0:
            self.begun = now
        self.drawn_cost += cost
        self.drawn_tokens += tokens
        self.inflight += 1
        self.used = now

    def end(self, cost: int, tokens: int, real_cost: int, real_tokens: int) -> int:
        """A request drawn from it ended: ``cost``/``tokens`` drawn, real usage charged.

        Usage past the reservation comes out of the undrawn part while there is some (as if
        drawn and ended at once), so what the chunk holds plus what it charged stays within
        what was granted. Returns the cost taken from the undrawn part.
        """
        left_cost, left_tokens = self.left
        over_cost = min(max(0, real_cost - cost), left_cost)
        over_tokens = min(max(0, real_tokens - tokens), left_tokens)
        self.drawn_cost += over_cost
        self.drawn_tokens += over_tokens
        self.ended_cost += cost + over_cost
        self.ended_tokens += tokens + over_tokens
        self.real_cost += real_cost
        self.real_tokens += real_tokens
        self.inflight -= 1
        self.dirty = True
        return over_cost

    @property
    def left(self) -> tuple[int, int]:
        """Undrawn (cost, tokens); nothing once retired."""
        if self.retired:
            return 0, 0
        return self.cost - self.drawn_cost, self.tokens - self.drawn_tokens

    def held(self) -> tuple[int, int]:
        """What Redis should hold for it: the undrawn part (until retired) and the draws in flight."""
        left_cost, left_tokens = self.left
        return (
            self.drawn_cost - self.ended_cost + left_cost,
            self.drawn_tokens - self.ended_tokens + left_tokens,
        )

    @property
    def final(self) -> bool:
        """Retired and no request in flight: the next checkpoint closes it."""
        return self.retired and self.inflight == 0

    def remaining_headers(self, now: float) -> dict[str, str]:
        """The rate-limit headers of a request drawn from it, as of the grant: the limits'
        resets then, less the time since, and the chunk's undrawn tokens available still."""
        if not self.shown:
            return {}
        limit, reset_ms = self.shown[-1]  # the tenant's limit wins when several are set
        reset = max(0.0, reset_ms - (now - self.taken) * 1000)
        remaining = int((limit.tau_ms - reset) / limit.interval_ms) + self.tokens - self.drawn_tokens
        return ratelimit.headers(limit, remaining, reset)


@dataclass(slots=True)
class Chunks:
    """This sidecar's chunks by key, the demand it sees, and what it holds per tenant."""

    chunks: dict[Key, list[Chunk]] = field(default_factory=dict)  # admitting
    retired: dict[str, Chunk] = field(default_factory=dict)  # by id: not closed in Redis yet
    demand: dict[Key, Demand] = field(default_factory=dict)
    taking: set[Key] = field(default_factory=set)  # a chunk is being asked for
    backoff: dict[Key, float] = field(default_factory=dict)  # monotonic time until which not
    targets: dict[Key, Size] = field(default_factory=dict)  # the last sizing of each key
    retirements: int = 0  # chunks retired so far (a change tells a caller one was just now)
    undrawn: dict[str, int] = field(default_factory=dict)  # tenant -> cost held unused

    def seen(self, key: Key, now: float, cost: int, tokens: int) -> Demand:
        demand = self.demand.get(key)
        if demand is None:
            if len(self.demand) >= MAX_KEYS:
                self.prune(now)
                if len(self.demand) >= MAX_KEYS:  # keys come from requests: bounded
                    held = self.chunks.keys() | self.taking
                    self.demand = {k: d for k, d in self.demand.items() if k in held}
                    self.targets = {k: t for k, t in self.targets.items() if k in held}
            demand = self.demand[key] = Demand(now)
        demand.add(now, cost, tokens)
        return demand

    def draw(self, key: Key, tenant: str, cost: int, tokens: int, now: float, demand: Demand) -> Chunk | None:
        """The chunk this request is admitted from, the oldest with room; on the way, the
        chunks without room for it and for less than two requests of the usual size are
        retired (one past its deadline is only passed over: a renewal extends it)."""
        for chunk in list(self.chunks.get(key, ())):
            if chunk.fits(cost, tokens, now):
                chunk.draw(cost, tokens, now)
                self._undrawn(tenant, -cost)
                return chunk
            left_cost, left_tokens = chunk.left
            per_cost, per_tokens = demand.usual()
            if left_cost < 2 * min(cost, per_cost) or left_tokens < 2 * min(tokens, per_tokens):
                self.retire(chunk)
        return None

    def end(self, chunk: Chunk, cost: int, tokens: int, real_cost: int, real_tokens: int) -> None:
        """A request drawn from ``chunk`` ended (``Chunk.end``)."""
        self._undrawn(chunk.ticket.tenant, -chunk.end(cost, tokens, real_cost, real_tokens))

    def may_ask(self, key: Key, now: float) -> bool:
        """No chunk of the key is on its way, and no refusal holds them back."""
        return key not in self.taking and self.backoff.get(key, 0.0) <= now

    def wants(self, key: Key, target: Size, now: float) -> bool:
        """What is left here is below the low-water mark (ask for a chunk, if ``may_ask``).
        A chunk past half its age counts as gone: its successor is asked for while it still
        admits (a thin tenant's next request would otherwise find none, and wait for Redis)."""
        left_cost = left_tokens = 0
        for chunk in self.chunks.get(key, ()):
            if chunk.ending(now):
                continue
            cost, tokens = chunk.left
            left_cost += cost
            left_tokens += tokens
        return left_tokens < LOW_WATER * target.tokens or (
            target.cost > 0 and left_cost < LOW_WATER * target.cost
        )

    def add(self, key: Key, chunk: Chunk) -> None:
        chunk.key = key
        self.chunks.setdefault(key, []).append(chunk)
        self._undrawn(chunk.ticket.tenant, chunk.cost)

    def succeeded(self, key: Key, now: float) -> bool:
        """A successor of the key's chunks was granted: those ``ending``, for which it was
        asked (``wants``), are retired, so a tenant holds one chunk's worth, not two. Whether
        any was."""
        ended = [chunk for chunk in self.chunks.get(key, ()) if chunk.ending(now)]
        for chunk in ended:
            self.retire(chunk)
        return bool(ended)

    def retire(self, chunk: Chunk) -> None:
        """No more draws; it waits in ``retired`` until closed in Redis."""
        if chunk.retired:
            return
        self._undrawn(chunk.ticket.tenant, -(chunk.cost - chunk.drawn_cost))
        chunk.retired = True
        chunk.dirty = True
        self.retirements += 1
        self._remove(chunk)
        self.retired[chunk.ticket.id] = chunk

    def forget(self, chunk: Chunk) -> None:
        """Closed in Redis: no more to say about it."""
        self.retired.pop(chunk.ticket.id, None)
        self._remove(chunk)

    def _remove(self, chunk: Chunk) -> None:
        chunks = self.chunks.get(chunk.key)
        if chunks is not None and chunk in chunks:
            chunks.remove(chunk)
            if not chunks:
                del self.chunks[chunk.key]

    def expire(self, now: float, seconds: float) -> None:
        """Retire the chunks idle for ``seconds`` (thin traffic: ``IDLE_SPANS`` times its
        tenant's last gaps), or older than ``AGE_LIMIT`` of them (thin traffic: its ``age_s``)."""
        for chunks in list(self.chunks.values()):
            for chunk in list(chunks):
                age = max(AGE_LIMIT * seconds, chunk.age_s)
                demand = self.demand.get(chunk.key)
                span = demand.span() if demand is not None else 0.0
                idle = max(seconds, min(IDLE_SPANS * span, age))
                if now - chunk.used >= idle or chunk.age(now) >= age:
                    self.retire(chunk)
        self.prune(now)

    def prune(self, now: float) -> None:
        """Forget the demand of keys gone quiet (and the backoffs that ended)."""
        for key, demand in list(self.demand.items()):
            quiet = not demand.arrivals or now - demand.arrivals[-1] >= FORGET_S
            if quiet and key not in self.chunks and key not in self.taking:
                del self.demand[key]
                self.targets.pop(key, None)
        self.backoff = {k: t for k, t in self.backoff.items() if t > now}

    def retire_all(self) -> None:
        for chunk in self:
            self.retire(chunk)

    def dirty(self, now: float) -> tuple[list[Chunk], float]:
        """The chunks with a state Redis has not been told and due a checkpoint (retired, or
        their ``checkpoint_s`` since their last), marked clean and sent now; and when the
        next of the others is due (``math.inf``: none waits)."""
        found, due = [], math.inf
        for chunk in self:
            if chunk.dirty:
                if chunk.retired or now - chunk.sent_at >= chunk.checkpoint_s:
                    chunk.dirty = False
                    chunk.sent_at = now
                    found.append(chunk)
                else:
                    due = min(due, chunk.sent_at + chunk.checkpoint_s)
        return found, due

    def __iter__(self) -> Iterator[Chunk]:
        """Every chunk not closed in Redis yet: admitting, then retired."""
        for chunks in list(self.chunks.values()):
            yield from list(chunks)
        yield from list(self.retired.values())

    def __bool__(self) -> bool:
        return bool(self.chunks) or bool(self.retired)

    def unused(self, tenant: str) -> int:
        """The cost the tenant's chunks hold undrawn (it comes back when they are retired)."""
        return self.undrawn.get(tenant, 0)

    def _undrawn(self, tenant: str, delta: int) -> None:
        left = self.undrawn.get(tenant, 0) + delta
        if left > 0:
            self.undrawn[tenant] = left
        else:
            self.undrawn.pop(tenant, None)
