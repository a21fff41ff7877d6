"""The policies in the request path: one ``admit`` before forwarding, one ``settle`` after.

The engine only orders the work of its collaborators, each the owner of its own state:

- ``admission`` decides (pure: identity, caps, downgrade, budgets, rate limits), and
  ``reserve`` makes at most one Redis round trip (``lua/admit.lua``: budget reservation and
  rate limits together, the model's limit across tenants in the same write);
- ``ahead`` admits a busy tenant's requests with no round trip at all: its budget and rate
  are reserved ahead in chunks, off the request path (chunks.py); near a limit chunks stop
  and every request reserves on its own again;
- ``settlement`` sends the real usage after the response (``lua/settle.lua``), riding in
  the write of the next admission (one pipelined connection, token_scaler/redis_channel.py),
  so under load a request costs one round trip; what Redis does not take is sent again
  every tick, so no refund or charge is lost while Redis is away;
- ``failopen`` decides without Redis when it is unreachable (an error or
  ``redisTimeoutMs``; a stalled event loop does not count): ``failMode: closed`` answers
  503, ``failMode: open`` admits within this sidecar's share of the budget left and of each
  rate limit, and the usage of those requests is charged once Redis is back;
- ``usage`` keeps the budget share each tenant last showed: soft caps and budget-share
  downgrades act on it (at most one request behind; the budget itself is exact);
- ``upkeep`` keeps Redis' clock offset (budget periods are UTC days and months on Redis'
  clock), the leases of the reservations in flight, this sidecar's presence among its
  scope's, and the scaler's saturation signal;
- ``spend`` keeps the scope's spend this hour (``spendGuard``): what it sets off is decided
  before anything else, and every request's real usage is added to it at settlement;
- ``busy`` reads the GPU and model-server signals of downgrade rules ``whenBusy``.

Background (``run``, once a tick): the policy file is reloaded when it changed (a bad
file keeps the policy in force, logs why and counts
``tokenscaler_policy_reloads_total{result="error"}``); queued settlements are sent; leases
are renewed; the saturation key is read when a downgrade rule needs it; the spend of the
hour is sent and read back; the busy signals are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.openai import ParsedRequest
from sidecar.policy import admission, budgets, identity
from sidecar.policy.admission import Admission, Decision
from sidecar.policy.ahead import Ahead
from sidecar.policy.busy import BusyWatch
from sidecar.policy.caps import Cap
from sidecar.policy.chunks import Chunks
from sidecar.policy.clock import Clock
from sidecar.policy.context import Context
from sidecar.policy.failopen import Outage
from sidecar.policy.metrics import PolicyMetrics
from sidecar.policy.policyfile import PolicyFile
from sidecar.policy.refusals import Rejection
from sidecar.policy.reserve import Reserver
from sidecar.policy.schema import Policy
from sidecar.policy.settlement import Corrections, Settlement, Settlements
from sidecar.policy.spend import SpendMeter, verdict
from sidecar.policy.store import Store
from sidecar.policy.tickets import Ticket
from sidecar.policy.upkeep import Leases, Presence, RedisClock, SaturationWatch
from sidecar.policy.usage import Usage
from token_scaler.record import ServerGauges
from token_scaler.redis_conn import REDIS_ERRORS
from token_scaler.redis_routing import Commands
from token_scaler.saturation import Saturation

__all__ = ["Admission", "PolicyEngine", "Rejection"]

log = logging.getLogger(__name__)


class PolicyEngine:
    def __init__(
        self,
        path: Path,
        channel: Commands,
        registry: CollectorRegistry,
        *,
        workload: str,
        tenant_header: str = "X-Tenant-ID",
        label: Callable[[str], str] = str,
        tick_s: float = 1.0,
        clock: Clock | None = None,
        dcgm_url: str | None = None,
        server_gauges: Callable[[], ServerGauges | None] = lambda: None,
    ) -> None:
        self.clock = clock = clock or Clock()
        self.file = file = PolicyFile(path)  # ConfigError at start-up, before any metric exists
        self.metrics = metrics = PolicyMetrics(registry)
        self.store = store = Store(channel)
        self._tenant_header = tenant_header
        self._label = label
        self._tick_s = tick_s
        ctx = Context(store, metrics, file, clock)
        held = Chunks()
        self.redis_clock = RedisClock(clock)
        self.usage = Usage(metrics, label, held.unused)
        self.outage = outage = Outage(ctx)
        self.corrections = Corrections(ctx)
        self.settlements = Settlements(ctx, outage, self.usage, self.corrections)
        self.presence = Presence(ctx, outage)
        self.leases = Leases(ctx, outage, tick_s)
        self.watch = SaturationWatch(ctx, outage, workload)
        self.spend = SpendMeter(ctx, outage, self.redis_clock, self.presence.id)
        self.busy = BusyWatch(ctx, dcgm_url, server_gauges)
        self.reserver = Reserver(
            ctx,
            self.redis_clock,
            self.usage,
            self.settlements,
            self.corrections,
            label,
            prefix=self.presence.id,
        )
        self.ahead = Ahead(
            held,
            ctx=ctx,
            outage=outage,
            usage=self.usage,
            presence=self.presence,
            reserver=self.reserver,
            settlements=self.settlements,
            corrections=self.corrections,
        )

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self.file.policy

    @property
    def saturation(self) -> Saturation:
        return self.watch.saturation

    @property
    def settling(self) -> bool:
        """Settlements (or chunks' checkpoints) are on their way to Redis."""
        return self.settlements.busy or self.ahead.busy

    def reload(self) -> bool:
        """Load the policy file again if it changed (``PolicyFile.reload``)."""
        if not self.file.reload(self.metrics):
            return False
        self.ahead.retire_all()  # limits may have changed
        self.busy.forget_removed()
        self.spend.show()
        return True

    # -- the request path

    async def admit(
        self, headers: Mapping[str, str], parsed: ParsedRequest, body: bytes, prompt_estimate: int
    ) -> Admission:
        started = time.perf_counter()
        policy = self.file.policy
        tenant = identity.tenant_of(policy, headers, self._tenant_header)
        rules = policy.tenant(tenant)
        now = self.redis_clock.now()
        day, month = budgets.periods(now)
        ratio = self.usage.ratio(tenant, rules.budget, day, month, self.outage.local(tenant))
        guard = verdict(policy, rules, parsed.model, self.spend.ratio(), now)
        decision = admission.decide(
            policy, rules, parsed, ratio, self.watch.saturation.saturated,
            spend=guard.downgrade, busy=self.busy.models,
        )  # fmt: skip
        result = Admission(tenant, body, decision.model, None)
        if guard.rejection is not None:
            self._refuse(result, guard.rejection)
            return result
        if decision.rejection is not None:
            self._refuse(result, decision.rejection)
            return result
        cap = decision.cap
        if admission.needs_redis(policy, decision):
            cap = await self._reserve(result, policy, decision, parsed, prompt_estimate, now)
            if result.rejection is not None:
                return result
        if admission.complete(result, decision, cap, parsed, body) and cap is not None:
            self.metrics.clamps.labels(self._label(tenant), cap.action).inc()
        route = decision.route
        if route is not None and parsed.model is not None:
            self.metrics.downgrades.labels(self._label(tenant), route.model, route.reason).inc()
        self.metrics.check.observe(time.perf_counter() - started)
        return result

    async def _reserve(
        self,
        result: Admission,
        policy: Policy,
        decision: Decision,
        parsed: ParsedRequest,
        prompt: int,
        now: float,
    ) -> Cap | None:
        """Reserve the budget and pass the rate limits: from a chunk, in Redis, or without it;
        sets ``result.rejection`` when refused. The cap the reservation pays for."""
        plan = admission.reservation(
            policy, decision, result.tenant, parsed.n, prompt, now, self.reserver.new_id()
        )
        ticket, limits, cap = plan.ticket, plan.limits, decision.cap
        if policy.chunks.enabled and self.ahead.draw(result, ticket, limits):
            return cap
        reply = wide_reply = None
        sent = not self.outage.down  # the scripts may run, whatever becomes of their replies
        if sent:
            if self.settlements.outbox:  # the settlements waiting ride along in the same write
                self.settlements.send_outbox()
            try:
                async with self.outage.guard.round_trip(policy.redis_timeout_s):
                    reply, wide_reply = await self.reserver.ask(ticket, plan.least, limits)
            except REDIS_ERRORS as exc:
                self.outage.failed("admit", exc)
            except asyncio.CancelledError:
                # The client went away while Redis decided: release what may be reserved.
                self.settlements.release(ticket)
                raise
        if reply is None:
            self._without_redis(result, decision, ticket, now, sent)
            return cap
        self.reserver.noted(reply, ticket)
        if self.reserver.refused(ticket, reply, wide_reply):
            self._refuse(result, admission.refusal(decision, result.tenant, limits, reply, wide_reply, now))
            return cap
        result.headers.update(admission.rate_headers(limits, reply, wide_reply))
        ticket.cost = reply.granted
        result.ticket = ticket
        self.leases.hold(ticket)
        self.metrics.admissions.labels("redis").inc()
        return admission.shortened(
            cap, ticket.budget, ticket.price, reply.granted, plan.cost, prompt, parsed.n
        )

    def _without_redis(
        self, result: Admission, decision: Decision, ticket: Ticket, now: float, sent: bool
    ) -> None:
        """Decide without Redis; ``sent``: an admission went out, its reply lost or late."""
        rejection = self.outage.admit(
            decision.rules, ticket, result.model, self.usage, self.presence.peers, now
        )
        if rejection is not None:
            if sent:
                self.settlements.release(ticket)
            self._refuse(result, rejection)
            return
        result.ticket = ticket
        self.metrics.fail_open.labels(self._label(result.tenant)).inc()
        self.metrics.admissions.labels("without_redis").inc()

    def _refuse(self, result: Admission, rejection: Rejection) -> None:
        self.metrics.rejections.labels(self._label(result.tenant), rejection.reason).inc()
        result.rejection = rejection

    def settle(
        self, result: Admission, prompt: int, generation: int, cached: tuple[int, int] = (0, 0)
    ) -> None:
        """Settle at the real usage (0 after a failure before any token), off the request path:
        charged to its chunk, or sent with the next admission (``settlement``). ``cached``: the
        prompt tokens read from and written to the provider's prompt cache (budgets.cost)."""
        self.spend.add(result.model, prompt, generation, cached)
        ticket, chunk = result.ticket, result.chunk
        if ticket is None:
            return
        result.ticket = result.chunk = None
        cost = budgets.cost(ticket.budget, ticket.price, prompt, generation, cached)
        if chunk is not None:
            self.ahead.end(chunk, ticket, cost, prompt + generation)
            return
        self.leases.end(ticket.id)
        if not ticket.reserved:
            self.outage.settled(ticket, cost, prompt + generation, self.presence.peers)
        self.settlements.add(Settlement(ticket, cost, prompt + generation))

    # -- background

    async def tick(self) -> None:
        self.reload()
        self.ahead.expire()
        if self.outage.down:
            # The charges made without Redis reach it before admissions go to it again: an
            # admission first would give away room those requests have used already.
            if not await self.outage.reachable() or not await self.settlements.reconcile():
                return
            self.outage.back(len(self.settlements.pending))
        await self.settlements.resend()
        self.ahead.send_checkpoints()
        if not self.redis_clock.synced:
            await self.redis_clock.sync(self.store, self.outage, self.file.background_timeout_s)
        if self.file.announces and self.presence.due():
            await self.presence.announce()
        if (self.leases or self.ahead.chunks) and not self.outage.down and self.leases.due():
            await self.leases.renew(list(self.ahead.chunks))
        if self.file.policy.watches_saturation:
            await self.watch.poll()
        if self.spend.enabled:
            await self.spend.sync()
        if self.file.policy.watches_busy:
            await self.busy.poll()

    async def run(self) -> None:
        self.outage.guard.start()
        while True:  # the first tick at once: it reads Redis' clock
            try:
                await self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("policy tick failed")
            await asyncio.sleep(self._tick_s)

    async def _settled(self, timeout_s: float) -> None:
        if self.settlements.inflight:
            await asyncio.wait(set(self.settlements.inflight), timeout=timeout_s)

    async def close(self, timeout_s: float) -> bool:
        """Wait for settlements in flight, then send what is queued; False if some remain."""
        self.outage.guard.stop()
        await self.ahead.stop(timeout_s)
        self.settlements.send_outbox()
        await self._settled(timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.tick(), timeout_s)
        if self.settlements.outbox:  # what the checkpoints' replies posted (a chunk Redis lost)
            self.settlements.send_outbox()
        await self._settled(timeout_s)  # the checkpoints tick sent, and those
        if self.file.announces and not self.outage.down:
            await self.presence.leave(timeout_s)
        await self.busy.close()
        if self.spend.unsent:
            log.warning("not delivered to Redis at shutdown: spend of %d billionths", self.spend.unsent)
        self.ahead.stop_timer()  # what is left is said below
        left = list(self.ahead.chunks)
        undelivered = len(self.settlements.pending) + len(self.settlements.outbox)
        if undelivered or left:
            log.warning(
                "not delivered to Redis at shutdown: %d policy settlements, %d chunks (their leases "
                "release what they hold: %d tokens charged to them since their last checkpoint are lost)",
                undelivered,
                len(left),
                sum(chunk.real_tokens - chunk.acked[1] for chunk in left),
            )
        return not (undelivered or left)
