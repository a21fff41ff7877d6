"""What the model server says about itself: its Prometheus metrics, read once a second.

The sidecar counts tokens; the server knows what the sidecar cannot see: how many
requests it is running and how many wait in its own queue, and how full its KV cache is.
The poller reads ``--model-metrics-url`` (default: the upstream's ``/metrics``) every
interval and keeps the latest ``ServerGauges``; each stream record carries them (field
``s``, ``token_scaler/record.py``), and the scaler makes KV pressure a floor on the
replicas it asks for (``kvCacheTarget``).

Metric names by server (the first found of each gauge; values summed over label sets,
as one server can list several models):

- vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (a fraction despite its name; ``vllm:gpu_cache_usage_perc``
  in older releases);
- llama.cpp (``--metrics``): ``llamacpp:requests_processing``, ``llamacpp:requests_deferred``,
  ``llamacpp:kv_cache_usage_ratio`` (only builds that still export it);
- SGLang: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``;
- TGI: ``tgi_batch_current_size``, ``tgi_queue_size`` (no KV gauge).

A server that answers with something else than Prometheus text, or not at all, is
logged once and asked again every ``RETRY_S``: the records then carry no ``s``, which
every reader takes as "not reported". Gauges older than ``STALE_S`` are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from token_scaler.record import ServerGauges
from token_scaler.redis_conn import redact

log = logging.getLogger("token_scaler.sidecar.server_gauges")

RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing", "sglang:num_running_reqs",
           "tgi_batch_current_size")  # fmt: skip
WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred", "sglang:num_queue_reqs",
           "tgi_queue_size")  # fmt: skip
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio",
            "sglang:token_usage")  # fmt: skip
STALE_S = 3.0
RETRY_S = 30.0


def parse(text: str) -> ServerGauges:
    """The gauges in a Prometheus text exposition (ValueError when it is not one)."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in RUNNING + WAITING + KV_USAGE:
                sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)

    def first(names: tuple[str, ...]) -> float | None:
        return next((sums[n] for n in names if n in sums), None)

    running, waiting, kv = first(RUNNING), first(WAITING), first(KV_USAGE)
    return ServerGauges(
        None if running is None else max(0, round(running)),
        None if waiting is None else max(0, round(waiting)),
        None if kv is None else min(1.0, max(0.0, kv)),
    )


class ServerGaugePoller:
    """Reads the server's metrics every ``interval_s``; ``latest()`` is what a record carries."""

    def __init__(
        self,
        url: str,
        interval_s: float = 1.0,
        timeout_s: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._monotonic = monotonic
        self._latest: tuple[float, ServerGauges] | None = None
        self._failing = False

    def latest(self) -> ServerGauges | None:
        if self._latest is None or self._monotonic() - self._latest[0] > STALE_S:
            return None
        return self._latest[1]

    async def poll_once(self, session: aiohttp.ClientSession) -> bool:
        """One read; False (logged once until it works again) when it fails."""
        try:
            async with session.get(self.url, timeout=self.timeout) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                gauges = parse(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            if not self._failing:
                log.warning(
                    "model server metrics at %s unreadable (%s); records carry no server gauges, "
                    "asking again every %gs",
                    redact(self.url),
                    exc or type(exc).__name__,
                    RETRY_S,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("model server metrics at %s readable again", redact(self.url))
        self._failing = False
        self._latest = (self._monotonic(), gauges)
        return True

    async def run(self) -> None:
        """Poll until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                ok = await self.poll_once(session)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.sleep(self.interval_s if ok else RETRY_S)
