"""The sidecar's presence in Redis, for gateways (``token_scaler/presence.py`` is the contract).

Started once the proxy serves; a heartbeat every ``HEARTBEAT_S`` carries the address to
reach it at, the models it serves, its in-flight token cap and what its meter holds in
flight. ``leave()`` at SIGTERM, before the drain. Off the request path: a failed
heartbeat is logged once per outage and retried at the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from sidecar.meter import Meter
from token_scaler.presence import FORGET_MS, HEARTBEAT, HEARTBEAT_S, LEAVE, Announcement, presence_keys
from token_scaler.redis_conn import REDIS_ERRORS, Client

log = logging.getLogger(__name__)

MODELS_TIMEOUT_S = 2.0


def advertised_url(advertise: str | None, port: int, environ: Mapping[str, str]) -> str | None:
    """``--advertise`` when given, else ``http://$POD_IP:<port>``, else None (no announcement)."""
    if advertise:
        return advertise.rstrip("/")
    pod_ip = environ.get("POD_IP", "").strip()
    if not pod_ip:
        return None
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}"


async def upstream_models(session: aiohttp.ClientSession, upstream: str) -> tuple[str, ...] | None:
    """The model ids the upstream lists at ``/v1/models``; None when it cannot say."""
    try:
        async with asyncio.timeout(MODELS_TIMEOUT_S):
            async with session.get(upstream.rstrip("/") + "/v1/models") as response:
                if response.status != 200:
                    return None
                doc: Any = await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return tuple(m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))


class Announcer:
    def __init__(
        self,
        client: Client,
        meter: Meter,
        *,
        workload: str,
        sidecar_id: str,
        url: str,
        models: tuple[str, ...] | None,
        capacity: int,
        slots: int = 0,
        interval_s: float = HEARTBEAT_S,
    ) -> None:
        self._client = client
        self._meter = meter
        self._keys = presence_keys(workload)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._leave = client.register_script(LEAVE)
        self.sidecar_id = sidecar_id
        self.url = url
        self.models = models  # None: not known yet (asked of the upstream at each tick)
        self.capacity = capacity
        self.slots = slots
        self.interval_s = interval_s
        self._failing = False
        self._lock = asyncio.Lock()  # a heartbeat never lands after the leave
        self.left = False

    def announcement(self) -> Announcement:
        inflight, prompt, generation = self._meter.open_totals()
        return Announcement(
            self.url, self.models or (), self.capacity, inflight, prompt, generation, self.slots
        )

    async def beat(self) -> bool:
        """One heartbeat; False when Redis did not take it (or the sidecar left)."""
        try:
            async with self._lock:
                if self.left:
                    return False
                args: list[str | int] = [self.sidecar_id, self.announcement().encode(), FORGET_MS]
                await self._heartbeat(keys=self._keys, args=args)
        except REDIS_ERRORS as exc:
            if not self._failing:
                log.warning("cannot announce this sidecar to gateways (retrying each second): %s", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("announcing this sidecar to gateways again")
        self._failing = False
        return True

    async def run(self, session: aiohttp.ClientSession, upstream: str) -> None:
        """Heartbeat every interval until cancelled or ``leave()``."""
        while not self.left:
            if self.models is None:
                self.models = await upstream_models(session, upstream)
            await self.beat()
            await asyncio.sleep(self.interval_s)

    async def leave(self) -> None:
        """Remove this sidecar from the replicas gateways route to (best effort)."""
        try:
            async with self._lock:
                self.left = True
                await self._leave(keys=self._keys, args=[self.sidecar_id])
        except REDIS_ERRORS as exc:
            log.warning("could not withdraw this sidecar's announcement (gateways drop it by age): %s", exc)
