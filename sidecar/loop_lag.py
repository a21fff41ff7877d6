"""How late the event loop runs what is due: the wait every request in the process shares.

Each step of a request (reading the body, the policy check, forwarding, answering) waits for the
loop to finish the callback running before it, so one callback that holds the loop for 5 ms adds
up to 5 ms to every request due meanwhile. Request latency shows such stalls only through the
model server's and the client's own scatter; a timer that asks to wake every ``INTERVAL_S`` and
measures how late it woke shows them directly, at any load, and its histogram is the wait of a
step arriving at a random moment. The timer's own resolution is about a millisecond (uvloop's
timers are libuv's, in whole milliseconds), so the buckets that tell stalls start at 2 ms.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

INTERVAL_S = 0.01  # 100 wake-ups a second: a few microseconds of CPU each
BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class LoopLag:
    """Samples the event loop's lateness into ``tokenscaler_event_loop_lag_seconds``."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lag = Histogram(
            "tokenscaler_event_loop_lag_seconds",
            f"How late a timer due every {interval_s * 1000:g} ms ran: the time any request step "
            "waited for the event loop then (resolution about 1 ms).",
            buckets=BUCKETS,
            registry=registry,
        )

    async def run(self) -> None:
        observe = self.lag.observe
        while True:
            due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            # uvloop arms timers on the clock it read at the start of the loop's iteration:
            # a timer may fire up to that iteration's age early, which is no negative lag.
            observe(max(0.0, time.perf_counter() - due))
