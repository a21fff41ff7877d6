"""Live replicas from their sidecars' announcements in Redis (``token_scaler/presence.py``).

One read (the ``LIVE`` script) every ``interval_s``: sidecars whose last heartbeat is
within the liveness bound, on Redis' clock. A sidecar that withdrew at SIGTERM is gone
at the next read; one that died, once its last heartbeat is older than the bound.
While Redis cannot be read the last set is kept (the replicas are probably still there;
those that are not refuse connections and are left out for a while).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.router import Router
from token_scaler import presence
from token_scaler.presence import LIVE, Announcement, PresenceError, presence_keys

log = logging.getLogger(__name__)


class Discovery:
    def __init__(
        self,
        client: aioredis.Redis,
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
        self._bad: set[str] = set()
        self._failing = False
        self.reads = 0

    async def poll_once(self) -> None:
        reply: Any = await self._script(keys=self._keys, args=[self.liveness_ms])
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
            log.info("replica %s at %s is live", rid, self.router.replicas[rid].url)
        for rid in removed:
            log.info("replica %s is gone", rid)
        self.metrics.replicas.set(len(self.router.replicas))
        self.on_change()

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                if self._failing:
                    log.info("reading the replicas' announcements again")
                self._failing = False
            except (TimeoutError, RedisError, OSError) as exc:
                if not self._failing:
                    log.warning("cannot read the replicas' announcements (keeping the last ones): %s", exc)
                self._failing = True
            await asyncio.sleep(self.interval_s)
