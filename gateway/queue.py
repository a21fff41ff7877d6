"""The gateway's hold queue: requests waiting for a replica, bounded in count and tokens.

Requests leave in arrival order: ``dispatch`` walks the queue oldest first and hands
each request the replica ``pick`` gives it; once a model's oldest waiting request
finds no room, no later request of that model overtakes it (requests of other models
still go). A request leaves the queue exactly once: handed a replica (its future gets
it, and the replica's load already counts it), or removed by its own handler
(timeout, client gone), or refused when the gateway stops.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.router import Replica


class QueueFull(Exception):
    """The queue's bound on requests or tokens would be passed; the message says which."""


@dataclass(eq=False, slots=True)
class Waiter:
    model: str | None
    tokens: int
    arrived: float
    future: asyncio.Future[Replica] = field(repr=False)


class HoldQueue:
    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self._waiting: deque[Waiter] = deque()
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, model: str | None, tokens: int) -> Waiter:
        if len(self._waiting) >= self.max_requests:
            raise QueueFull(f"the gateway already holds {self.max_requests} requests (its bound)")
        if self.tokens + tokens > self.max_tokens:
            raise QueueFull(
                f"holding this request's {tokens} tokens would pass the gateway's bound of "
                f"{self.max_tokens} held tokens ({self.tokens} held)"
            )
        waiter = Waiter(model, tokens, time.monotonic(), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self.tokens += tokens
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        """Take a waiter out (its timeout, its client gone); False when it already left."""
        try:
            self._waiting.remove(waiter)
        except ValueError:
            return False
        self.tokens -= waiter.tokens
        return True

    def dispatch(self, place: Callable[[Waiter], Replica | None]) -> int:
        """Hand replicas to waiting requests, oldest first; how many left the queue.

        ``place`` picks a replica for the waiter and books the request on it, or returns None.
        """
        if not self._waiting:
            return 0
        blocked: set[str | None] = set()
        kept: deque[Waiter] = deque()
        sent = 0
        while self._waiting:
            waiter = self._waiting.popleft()
            if waiter.future.done():  # cancelled by its handler: already gone
                self.tokens -= waiter.tokens
                continue
            replica = None if waiter.model in blocked else place(waiter)
            if replica is None:
                blocked.add(waiter.model)
                kept.append(waiter)
                continue
            self.tokens -= waiter.tokens
            waiter.future.set_result(replica)
            sent += 1
        self._waiting = kept
        return sent

    def oldest_wait(self) -> float:
        return time.monotonic() - self._waiting[0].arrived if self._waiting else 0.0

    def reject_all(self, exc: BaseException) -> int:
        """Refuse every waiting request (the gateway stops)."""
        count = 0
        while self._waiting:
            waiter = self._waiting.popleft()
            self.tokens -= waiter.tokens
            if not waiter.future.done():
                waiter.future.set_exception(exc)
                count += 1
        return count
