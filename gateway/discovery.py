"""Live replicas from their sidecars' announcements in Redis (``token_scaler/presence.py``).

One read (the ``LIVE`` script) every ``interval_s``: sidecars whose last heartbeat is
within the liveness bound, on Redis' clock. A sidecar that withdrew at SIGTERM is gone
at the next read; one that died, once its last heartbeat is older than the bound.
While Redis cannot be read the last set is kept (the replicas are probably still there;
those that are not refuse connections and are left out for a while).

A replica a read lists for the first time announced itself after the read before (on
Redis' clock); that bound, and whether held requests went to it in the same read, are kept
on the replica (``Router.Replica``): from them ``/debug/replicas`` shows how long held
requests waited once a replica was there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.metrics import GatewayMetrics
from gateway.router import Router
from token_scaler import presence
from token_scaler.presence import LIVE, Announcement, PresenceError, presence_keys
from token_scaler.redis_conn import REDIS_ERRORS, Client

log = logging.getLogger(__name__)


class Discovery:
    def __init__(
        self,
        client: Client,
        router: Router,
        metrics: GatewayMetrics,
        *,
        workload: str,
        liveness_s: float,
        interval_s: float,
        on_change: Callable[[], None],
    ) -> None:
        self._client = client
        self._script = client.register_script(LIVE)
        self._keys = presence_keys(workload)
        self.router = router
        self.metrics = metrics
        self.liveness_ms = round(liveness_s * 1000)
        self.interval_s = interval_s
        self.on_change = on_change
        self.workload = workload
        self._bad: set[str] = set()
        self._failing = False
        self._last_ms: int | None = None  # Redis time of the last read
        self.reads = 0

    async def poll_once(self) -> None:
        reply: Any = await self._script(keys=self._keys, args=[self.liveness_ms])
        now = time.monotonic()
        read_ms = int(reply[0])
        live: dict[str, tuple[int, Announcement]] = {}
        for i in range(1, len(reply), 3):
            rid = reply[i].decode()
            try:
                live[rid] = (int(float(reply[i + 1])), presence.decode(reply[i + 2]))
            except PresenceError as exc:
                self.metrics.bad_announcements.inc()
                if rid not in self._bad:
                    self._bad.add(rid)
                    log.warning("skipping the announcement of replica %s: %s", rid, exc)
        added, removed = self.router.update(live)
        self.reads += 1
        for rid in added:
            replica = self.router.replicas[rid]
            replica.seen_at = now
            if self._last_ms is not None:
                replica.announced_within_ms = read_ms - self._last_ms
            log.info("replica %s of %s at %s is live", rid, self.workload, replica.url)
        for rid in removed:
            log.info("replica %s of %s is gone", rid, self.workload)
        self._last_ms = read_ms
        self.metrics.replicas.labels(self.workload).set(len(self.router.replicas))
        self.on_change()
        for rid in added:
            replica = self.router.replicas[rid]
            replica.held_in_first_read = replica.first_held_at is not None

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                if self._failing:
                    log.info("reading the replicas' announcements again")
                self._failing = False
            except REDIS_ERRORS as exc:
                if not self._failing:
                    log.warning("cannot read the replicas' announcements (keeping the last ones): %s", exc)
                self._failing = True
            await asyncio.sleep(self.interval_s)
