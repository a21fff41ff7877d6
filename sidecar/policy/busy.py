"""The busy trigger: downgrade rules ``whenBusy`` the model server stays saturated.

Signals, read once a tick:

- ``gpu_util``: DCGM exporter's ``DCGM_FI_DEV_GPU_UTIL`` (percent, read as a share 0-1) at
  ``--dcgm-url``, the mean over this pod's GPUs (the samples whose ``pod`` label is this
  pod's name, when the exporter maps GPUs to pods; else over every GPU it lists); an
  exporter that does not answer is asked again every ``RETRY_S``;
- ``kv_cache`` and ``waiting``: the model server's own KV-cache usage (0-1) and requests
  waiting in its queue, as the sidecar already reads them (server_gauges.py).

Each rule keeps a ``Hysteresis``: it applies once a signal it names has stayed above its
threshold for ``for`` seconds (every reading in that time above), and stops once every
signal it names has stayed below its lower threshold for ``leaveAfter`` seconds. A signal
that cannot be read does not count; with none readable the rule counts as calm.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sidecar.policy.context import Context
from sidecar.policy.schema import GPU_UTIL, KV_CACHE, WAITING, Busy
from token_scaler.record import ServerGauges

log = logging.getLogger(__name__)

DCGM_METRIC = "DCGM_FI_DEV_GPU_UTIL"
BUSY = "busy"  # the reason of a downgrade
BUSY_DOWNGRADE = "busy_downgrade"  # the action of ``tokenscaler_policy_action_in_force``
READ_TIMEOUT_S = 0.5
RETRY_S = 30.0  # an exporter that did not answer is asked again after this


def gpu_util(text: str, pod: str | None) -> float | None:
    """The mean GPU utilisation (0-1) in a DCGM exporter's page: this pod's GPUs when the
    exporter names pods and lists this one, else all; None when it lists none."""
    mine: list[float] = []
    every: list[float] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != DCGM_METRIC:
                continue
            every.append(float(sample.value))
            if pod is not None and sample.labels.get("pod") == pod:
                mine.append(float(sample.value))
    found = mine or every
    if not found:
        return None
    return min(1.0, max(0.0, sum(found) / len(found) / 100))


@dataclass(slots=True)
class Hysteresis:
    """Whether a ``whenBusy`` rule is in force, from readings at moments (monotonic seconds)."""

    on: bool = False
    since: float | None = None  # when the readings began to point the other way

    def step(self, busy: Busy, readings: Mapping[str, float], now: float) -> bool:
        values = [(t, readings[t.signal]) for t in busy.thresholds if t.signal in readings]
        if self.on:
            toward, wait = all(v < t.below for t, v in values), busy.leave_s
        else:
            toward, wait = any(v > t.above for t, v in values), busy.enter_s
        if not toward:
            self.since = None
        else:
            if self.since is None:
                self.since = now
            if now - self.since >= wait:
                self.on, self.since = not self.on, None
        return self.on


class BusyWatch:
    """The signals and each ``whenBusy`` rule's state."""

    def __init__(
        self,
        ctx: Context,
        dcgm_url: str | None,
        server_gauges: Callable[[], ServerGauges | None],
        pod: str | None = None,
    ) -> None:
        self._ctx = ctx
        self._dcgm_url = dcgm_url
        self._server_gauges = server_gauges
        self._pod = pod if pod is not None else os.environ.get("POD_NAME") or socket.gethostname()
        self._states: dict[str, Hysteresis] = {}
        self._session: aiohttp.ClientSession | None = None
        self._failing = False
        self._retry_at = 0.0  # monotonic: when an exporter that failed is asked again
        self._warned = False
        self.readings: dict[str, float] = {}

    @property
    def models(self) -> frozenset[str]:
        """The models whose ``whenBusy`` rule is in force."""
        return frozenset(model for model, state in self._states.items() if state.on)

    async def _dcgm(self) -> float | None:
        if self._dcgm_url is None or (self._failing and self._ctx.clock.monotonic() < self._retry_at):
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S))
        try:
            async with self._session.get(self._dcgm_url) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                value = gpu_util(await response.text(), self._pod)
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            if not self._failing:
                log.warning(
                    "DCGM exporter at %s unreadable (%s): GPU utilisation not known", self._dcgm_url, exc
                )
            self._failing = True
            return None
        self._failing = False
        return value

    async def read(self) -> dict[str, float]:
        readings: dict[str, float] = {}
        util = await self._dcgm()
        if util is not None:
            readings[GPU_UTIL] = util
        gauges = self._server_gauges()
        if gauges is not None:
            if gauges.kv_usage is not None:
                readings[KV_CACHE] = gauges.kv_usage
            if gauges.waiting is not None:
                readings[WAITING] = float(gauges.waiting)
        return readings

    async def poll(self) -> None:
        """Read the signals and step every ``whenBusy`` rule."""
        rules = {
            m: r.when_busy for m, r in self._ctx.file.policy.downgrades.items() if r.when_busy is not None
        }
        wants_gpu = any(t.signal == GPU_UTIL for busy in rules.values() for t in busy.thresholds)
        if wants_gpu and not self._warned and self._dcgm_url is None:
            log.warning("a downgrade rule has whenBusy.gpuUtilAbove but no --dcgm-url is set: never read")
            self._warned = True
        self.readings = await self.read()
        now = self._ctx.clock.monotonic()
        self.forget_removed()
        metrics, scope = self._ctx.metrics, self._ctx.file.policy.scope
        for model, busy in rules.items():
            state = self._states.setdefault(model, Hysteresis())
            was = state.on
            if state.step(busy, self.readings, now) != was:
                log.warning(
                    "downgrade of %s when busy: %s (signals %s)", model, "in force" if state.on else "lifted",
                    self.readings,
                )  # fmt: skip
            metrics.action_in_force.labels(BUSY_DOWNGRADE, scope, model).set(1 if state.on else 0)

    def forget_removed(self) -> None:
        """Drop the state of rules the policy in force no longer has (after a reload)."""
        policy = self._ctx.file.policy
        for model in list(self._states):
            rule = policy.downgrades.get(model)
            if rule is None or rule.when_busy is None:
                del self._states[model]
                self._ctx.metrics.action_in_force.labels(BUSY_DOWNGRADE, policy.scope, model).set(0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
