"""Token-weighted routing: the live replica with the least outstanding weighted tokens.

A request weighs its prompt estimate plus the generation it may still produce
(n x max_tokens, or the default when it sets none); as a stream passes, each event
takes one token off what is outstanding. A replica's load is the larger of what this
gateway has outstanding at it (exact, instant) and what its sidecar last announced
(every gateway's requests and direct clients', a heartbeat old). A replica with a
``capacity`` takes a request only while its load plus the request stays within it, or
when it is idle (a request larger than any capacity still runs, alone); one with
``slots`` (the server's concurrency) only while it has fewer requests in flight: past its
slots a request would wait in the server's own queue, where no one sees it as demand and
a faster replica cannot take it. When no replica can take a request, the caller holds it.

``pick`` is a scan of the replicas that serve the model: a few microseconds per
hundred replicas (``python -m bench.gateway_bench route`` measures it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from token_scaler.presence import Announcement

# How long a replica that refused a connection is left out (its heartbeat may still be fresh).
DOWN_S = 5.0


@dataclass(eq=False, slots=True)
class Replica:
    id: str
    url: str
    models: frozenset[str]
    capacity: int
    slots: int = 0  # requests it takes at once; 0: no cap
    announced: int = 0  # the sidecar's announced backlog: prompt + generation tokens
    local: int = 0  # weighted tokens this gateway has outstanding at it
    requests: int = 0  # this gateway's requests at it
    announced_requests: int = 0  # the sidecar's in-flight requests, kept like ``announced``
    down_until: float = 0.0
    heartbeat_ms: int = -1  # Redis time of the announcement ``announced`` comes from
    # When the gateway first listed it, and its first held request (``Discovery`` and the proxy
    # fill these in; ``/debug/replicas`` shows them).
    seen_at: float = 0.0  # monotonic time of the read that first listed it
    announced_within_ms: int | None = None  # Redis time since the read before (None: the first read)
    held_in_first_read: bool = False  # held requests went to it in that very read
    first_held_at: float | None = None  # monotonic: a held request was handed to it
    first_held_answer_at: float | None = None  # monotonic: the answer to one began to reach its client

    @property
    def load(self) -> int:
        return self.local if self.local > self.announced else self.announced


@dataclass
class Router:
    replicas: dict[str, Replica] = field(default_factory=dict)
    _any: list[Replica] = field(default_factory=list)  # replicas that announce no model: any
    _by_model: dict[str, list[Replica]] = field(default_factory=dict)

    def update(self, live: dict[str, tuple[int, Announcement]]) -> tuple[list[str], list[str]]:
        """Take the live announcements ({id: (heartbeat ms, announcement)}); returns (ids
        added, ids removed)."""
        added = [i for i in live if i not in self.replicas]
        removed = [i for i in self.replicas if i not in live]
        changed = bool(added or removed)
        for rid in removed:
            del self.replicas[rid]
        for rid, (heartbeat_ms, a) in live.items():
            replica = self.replicas.get(rid)
            models = frozenset(a.models)
            if replica is None or replica.url != a.url or replica.models != models:
                fresh = Replica(rid, a.url, models, a.capacity)
                if replica is not None:  # same id, new address or models: keep what is outstanding
                    fresh.local, fresh.requests = replica.local, replica.requests
                self.replicas[rid] = replica = fresh
                changed = True
            replica.capacity, replica.slots = a.capacity, a.slots
            if heartbeat_ms != replica.heartbeat_ms:  # a new heartbeat; else keep what changed since
                replica.heartbeat_ms = heartbeat_ms
                replica.announced = a.backlog_prompt + a.backlog_generation
                replica.announced_requests = a.inflight
        if changed:
            self._index()
        return added, removed

    def _index(self) -> None:
        self._any = [r for r in self.replicas.values() if not r.models]
        self._by_model = {}
        for r in self.replicas.values():
            for m in r.models:
                self._by_model.setdefault(m, []).append(r)

    def candidates(self, model: str | None) -> list[Replica]:
        if model is None:
            return list(self.replicas.values())
        named = self._by_model.get(model)
        if named is None:
            return self._any
        return named + self._any if self._any else named

    def announces(self, model: str) -> bool:
        """A live replica names the model in its announcement."""
        return model in self._by_model

    def announced_models(self) -> set[str]:
        return set(self._by_model)

    def open_to_any(self) -> bool:
        """It may serve a model no replica names: none is live, or one announces no models."""
        return not self.replicas or bool(self._any)

    def pick(self, model: str | None, tokens: int, now: float | None = None) -> Replica | None:
        """The least-loaded replica of ``model`` with room for ``tokens``; None: hold the request."""
        now = time.monotonic() if now is None else now
        best: Replica | None = None
        best_load = 0
        for r in self.candidates(model):
            if r.down_until > now:
                continue
            load = r.local if r.local > r.announced else r.announced
            if r.capacity and load and load + tokens > r.capacity:
                continue
            if r.slots and max(r.requests, r.announced_requests) >= r.slots:
                continue
            if best is None or load < best_load:
                best, best_load = r, load
        return best

    def start(self, replica: Replica, tokens: int) -> None:
        replica.local += tokens
        replica.requests += 1
        replica.announced_requests += 1
        # Until the next heartbeat the announcement does not hold this request: add it, and take
        # off what ends or streams (a heartbeat then replaces the sum with the sidecar's count).
        replica.announced += tokens

    def progress(self, replica: Replica, tokens: int) -> None:
        replica.local -= tokens
        replica.announced = max(0, replica.announced - tokens)

    def finish(self, replica: Replica, outstanding: int) -> None:
        replica.local -= outstanding
        replica.requests -= 1
        replica.announced_requests = max(0, replica.announced_requests - 1)
        replica.announced = max(0, replica.announced - outstanding)

    def mark_down(self, replica: Replica, now: float | None = None) -> None:
        replica.down_until = (time.monotonic() if now is None else now) + DOWN_S
