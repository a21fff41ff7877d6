"""The policies in the request path: one ``admit`` before forwarding, one ``settle`` after.

``admit`` decides with the pure modules (identity, caps, downgrade, budgets, ratelimit)
and makes at most one Redis round trip (``lua/admit.lua``: budget reservation and rate
limits together). ``settle`` runs after the response, off the request path: it sends the
real usage (``lua/settle.lua``), riding in the write of the next admission (one pipelined
connection, token_scaler/redis_channel.py), so under load a request costs one round trip;
a settlement Redis does not take waits in a queue and is retried every tick, so no refund
or charge is lost while Redis is away.

Redis unreachable (an error or ``redisTimeoutMs``): for the next tick every request is
decided without it (failopen.py: a stalled event loop does not count). ``failMode: closed``
answers 503; ``failMode: open`` admits within this sidecar's share of the budget left, and keeps
the real usage of those requests in the queue: when Redis is back they are charged to the
shared budgets (reconciled). Rate limits are enforced locally meanwhile, each sidecar its
share: the limit divided by the sidecars of the scope seen in the last minute (each
announces itself every ``ANNOUNCE_S``).

A tenant busy at this sidecar is admitted without the round trip: its budget and rate are
reserved ahead in chunks, off the request path, and requests draw from them (chunks.py);
near a limit chunks stop and every request reserves on its own again.

Reservations are leased (``reservationLeaseSeconds``): the sidecar renews the leases of
its requests in flight every third of it, so the reservation of a sidecar that died
mid-request is released by the tenant's next admission once its lease ends (store.py).

Budget periods (UTC day and month) are read on Redis' clock: every reply carries Redis'
time and the sidecar keeps its offset, so sidecars with skewed clocks charge one day.

Soft caps and budget-share downgrades act on the budget share this sidecar last saw for
the tenant (every reply carries it): at most one request behind. The budget itself is
exact: the reservation is atomic in Redis.

Background (``run``, once a tick): the policy file is reloaded when it changed (a bad
file keeps the policy in force, logs why and counts
``tokenscaler_policy_reloads_total{result="error"}``); the scaler's saturation key is read
when a downgrade rule needs it; queued settlements are sent; leases are renewed.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from redis.exceptions import RedisError, ResponseError

from sidecar import openai
from sidecar.openai import Kind, ParsedRequest
from sidecar.policy import budgets, caps, chunks, downgrade, failopen, identity, ratelimit, schema
from sidecar.policy.metrics import PolicyMetrics
from sidecar.policy.schema import CLOSED, MID_OFF, SHORTEN, Budget, Policy, Price, TenantPolicy
from sidecar.policy.scripts import Admit, Applied
from sidecar.policy.store import (
    Admitted,
    Item,
    ModelAdmitted,
    Settled,
    Store,
    TenantKeys,
    checkpoint_args,
    model_rate_key,
    settle_args,
    tenant_keys,
)
from token_scaler.errors import ConfigError
from token_scaler.redis_channel import Channel
from token_scaler.saturation import NOT_SATURATED, Saturation, decode, saturation_key

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
MAX_TENANTS_SEEN = 100_000  # budget shares remembered for soft caps and downgrades
BATCH = 200  # settlements per pipeline
# Settlements wait this long for the next admission to take them along (off the request
# path; at 20 requests/s and more nearly all ride, below that they go on their own).
SETTLE_LINGER_S = 0.05
# How often a sidecar announces itself (its peers' count sets its share of a rate limit
# while Redis is away); well inside store.PRESENCE_WINDOW_MS.
ANNOUNCE_S = 10.0
_REDIS_ERRORS = (TimeoutError, RedisError, OSError)


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    type: str
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Ticket:
    """What the settlement of one admitted request needs."""

    id: str
    keys: TenantKeys
    tenant: str
    day: str
    month: str
    budget: Budget
    price: Price
    tenant_interval: float
    model_interval: float
    cost: int  # reserved (granted)
    reserved: bool  # in Redis; False: admitted without it (fail-open)
    tokens: int = 0  # reserved tokens (prompt estimate + max_tokens x n)
    limits: list[tuple[str, ratelimit.Limit]] = field(default_factory=list)  # (local key, limit)
    wide_key: str | None = None  # the model's limit across tenants, when it has one
    wide_interval: float = 0.0
    chunk: chunks.Chunk | None = None  # drawn from a chunk reserved ahead (chunks.py)


@dataclass(slots=True)
class Admission:
    tenant: str
    body: bytes
    model: str | None  # as sent upstream
    max_tokens: int | None  # per choice, as sent upstream
    upstream: str | None = None  # another model server (a downgrade rule's ``upstream``)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    rejection: Rejection | None = None
    stream_limit: int | None = None  # generated pieces after which a stream is ended
    stream_mode: str = MID_OFF
    ticket: Ticket | None = None


@dataclass(slots=True)
class _Settlement:
    ticket: Ticket
    cost: int
    tokens: int
    moved: bool = False  # the model-wide limit was corrected (or needs no correction)


@dataclass(slots=True)
class _Checkpoint:
    """A chunk's state as sent, to apply its reply."""

    chunk: chunks.Chunk
    seq: int
    item: Item  # (keys, checkpoint.lua's arguments)
    charged: tuple[int, int]
    final: bool  # the last: the chunk is forgotten once Redis took it
    closed_before: bool  # an earlier checkpoint held nothing: the entry may be gone already


@dataclass(slots=True)
class _Used:
    day: str
    month: str
    day_used: int
    month_used: int


def _period_end(now: float, monthly: bool) -> float:
    """Seconds until the budget period (UTC day or month) starts again."""
    if not monthly:
        return budgets.DAY_S - now % budgets.DAY_S
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) - now


# Redis refusing for now: still loading, busy with a script, a replica after a failover, out
# of memory, ... (inside a script these read "READONLY ... script: <sha>, on @user_script").
_TRANSIENT = (
    "READONLY", "LOADING", "BUSY", "OOM", "MISCONF", "MASTERDOWN", "NOREPLICAS",
    "TRYAGAIN", "CLUSTERDOWN", "NOSCRIPT", "ERR max number of clients",
)  # fmt: skip


TENANT, PER_MODEL, WIDE = "tenant", "tenant-model", "model"  # the kinds of rate limit


def _which(admission: Admission, kind: str) -> str:
    """The limit that refused, as the 429's message names it."""
    if kind == WIDE:
        return f"model {admission.model} (all tenants)"
    if kind == PER_MODEL:
        return f"tenant {admission.tenant} and model {admission.model}"
    return f"tenant {admission.tenant}"


def _resets(
    limits: tuple[ratelimit.Limit | None, ...], reply: Admitted, wide_reply: ModelAdmitted | None
) -> list[tuple[ratelimit.Limit, float]]:
    """Each limit in force (of the tenant, the tenant and model, the model across tenants)
    with its reset (ms) from the admission's replies: the model's first, the tenant's last
    (it wins in the headers when several are set)."""
    tenant_limit, model_limit, wide_limit = limits
    found = (
        (wide_limit, wide_reply.reset_ms if wide_reply else 0),
        (model_limit, reply.model_reset_ms),
        (tenant_limit, reply.reset_ms),
    )
    return [(limit, float(reset)) for limit, reset in found if limit is not None]


def _kind_of(local_key: str) -> str:
    """The kind of limit a local limiter key stands for (see ``_reserve``)."""
    if local_key.startswith("\1"):
        return WIDE
    return PER_MODEL if "\0" in local_key else TENANT


def _script_fault(error: ResponseError) -> bool:
    """An error of the script itself (it would fail again), not Redis refusing for now."""
    text = str(error)
    if text.startswith(_TRANSIENT):
        return False
    return "script:" in text or "user_script" in text or text.startswith("WRONGTYPE")


class PolicyEngine:
    def __init__(
        self,
        path: Path,
        channel: Channel,
        registry: CollectorRegistry,
        *,
        workload: str,
        tenant_header: str = "X-Tenant-ID",
        label: Callable[[str], str] = str,
        tick_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._content = self._read()
        self.policy: Policy = schema.load(path)  # ConfigError at start-up
        self.store = Store(channel)
        self.metrics = PolicyMetrics(registry)
        self._workload = workload
        self._tenant_header = tenant_header
        self._label = label
        self._tick_s = tick_s
        self._clock = clock
        self._used: dict[str, _Used] = {}
        self._budget_gauges: dict[str, Gauge] = {}
        self._local: dict[str, int] = {}  # cost admitted without Redis, not reconciled yet
        self._pending: deque[_Settlement] = deque()
        self._outbox: list[_Settlement] = []
        self._linger: asyncio.TimerHandle | None = None
        self._checkpoint_timer: asyncio.TimerHandle | None = None  # the next checkpoint due
        self._checkpoint_due = math.inf
        self._inflight: set[asyncio.Task[bool]] = set()
        self._moves: set[asyncio.Task[None]] = set()
        self._down = False
        self._open: dict[str, Ticket] = {}  # reserved in Redis, not settled yet: their leases
        self._renewed = 0.0  # monotonic time of the last lease renewal
        self._offset_s = 0.0  # Redis' clock minus ours, from the last reply
        self._synced = False
        self._local_rates = ratelimit.LocalLimiter()  # while Redis is away (fail-open)
        self.guard = failopen.Guard()  # a stalled loop is not a slow Redis
        self._id = uuid.uuid4().hex[:16]  # this sidecar among the scope's (presence, reservation ids)
        self._ids = itertools.count()
        self._peers = 1  # sidecars of the scope seen in the last minute, this one included
        self._announced = -math.inf
        self._chunks = chunks.Chunks()
        self._takes: set[asyncio.Task[None]] = set()  # chunks being asked for
        self._generation = 0  # policy reloads: a chunk asked for before one is retired at once
        self._closing = False
        self.saturation: Saturation = NOT_SATURATED

    # -- the policy file

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def reload(self) -> bool:
        """Load the file again if it changed; a bad file keeps the policy in force.

        The content is compared, not only the mtime: an edit within the filesystem's
        timestamp granularity, or a ConfigMap's symlink swap, is seen all the same.
        """
        content = self._read()
        if content is None or content == self._content:
            return False
        self._content = content
        try:
            policy = schema.load(self.path)
        except ConfigError as exc:
            self.metrics.reloads.labels("error").inc()
            log.error("policy reload failed, the previous policy stays in force: %s", exc)
            return False
        self.policy = policy
        self.metrics.reloads.labels("ok").inc()
        log.info("policy reloaded from %s", self.path)
        return True

    # -- admission

    def _last_used(self, tenant: str, day: str, month: str) -> tuple[int, int] | None:
        """The tenant's budget used in this day and month as last seen (None: never seen)."""
        seen = self._used.get(tenant)
        if seen is None:
            return None
        return (seen.day_used if seen.day == day else 0, seen.month_used if seen.month == month else 0)

    def _ratio(self, tenant: str, budget: Budget, day: str, month: str) -> float:
        if not budget.enabled:
            return 0.0
        day_used, month_used = self._last_used(tenant, day, month) or (0, 0)
        # Chunks this sidecar holds unused are not spent: they come back when retired.
        local = self._local.get(tenant, 0) - self._chunks.undrawn.get(tenant, 0)
        return budgets.used_ratio(budget, day_used + local, month_used + local)

    def _saw(self, ticket: Ticket, day_used: int, month_used: int) -> None:
        """A reply's budget used, for the ticket's tenant and periods."""
        tenant, budget, day, month = ticket.tenant, ticket.budget, ticket.day, ticket.month
        if not budget.enabled:
            return
        if len(self._used) >= MAX_TENANTS_SEEN and tenant not in self._used:
            # Tenants come from requests: keep today's, forget older ones (at worst a soft cap
            # acts one request late for a tenant forgotten here).
            self._used = {t: u for t, u in self._used.items() if u.day == day}
            if len(self._used) >= MAX_TENANTS_SEEN:
                self._used.clear()
        self._used[tenant] = _Used(day, month, day_used, month_used)
        gauge = self._budget_gauges.get(tenant)
        if gauge is None:  # labels() looks the child up by its label values: once per tenant
            if len(self._budget_gauges) > MAX_TENANTS_SEEN:  # tenants come from requests: bounded
                self._budget_gauges.clear()
            gauge = self._budget_gauges[tenant] = self.metrics.budget_used.labels(self._label(tenant))
        unused = self._chunks.undrawn.get(tenant, 0)
        gauge.set(budgets.used_ratio(budget, day_used - unused, month_used - unused))

    async def admit(
        self, headers: Mapping[str, str], parsed: ParsedRequest, body: bytes, prompt_estimate: int
    ) -> Admission:
        started = time.perf_counter()
        policy = self.policy
        tenant = identity.tenant_of(policy, headers, self._tenant_header)
        rules = policy.tenant(tenant)
        now = self._clock() + self._offset_s
        day, month = budgets.periods(now)
        ratio = self._ratio(tenant, rules.budget, day, month)
        soft = caps.soft_cap(rules.soft_caps, ratio) if rules.soft_caps else None
        requested = parsed.model
        route = None
        if requested is not None and requested in policy.downgrades:
            route = downgrade.decide(policy.downgrades[requested], rules, ratio, self.saturation.saturated)
        model = route.model if route is not None else requested
        admission = Admission(tenant, body, model, None)
        cap = None
        if parsed.kind is not Kind.EMBEDDINGS:
            cap = caps.decide(rules, parsed.max_tokens, soft)
            if cap.reject is not None:
                self.metrics.rejections.labels(self._label(tenant), "max_tokens").inc()
                admission.rejection = Rejection(
                    400, "invalid_request_error", "max_tokens_above_ceiling", cap.reject
                )
                return admission
        if rules.needs_redis or (model is not None and model in policy.model_limits):
            cap = await self._reserve(admission, policy, rules, parsed, prompt_estimate, cap, soft, now)
            if admission.rejection is not None:
                return admission
        changed_cap = cap is not None and cap.action != caps.UNCHANGED
        if cap is not None:
            admission.max_tokens = cap.max_tokens
            if changed_cap:
                admission.headers["x-tokenscaler-max-tokens"] = cap.header()
                self.metrics.clamps.labels(self._label(tenant), cap.action).inc()
            budget = rules.budget
            if parsed.stream and budget.enabled and budget.mid_stream != MID_OFF:
                admission.stream_limit = cap.max_tokens * parsed.n
                admission.stream_mode = budget.mid_stream
        if route is not None and requested is not None:
            admission.upstream = route.upstream
            admission.headers["x-tokenscaler-model"] = route.header(requested)
            self.metrics.downgrades.labels(self._label(tenant), route.model, route.reason).inc()
        if changed_cap or route is not None:
            admission.body = openai.rewritten(
                parsed.kind,
                body,
                max_tokens=cap.max_tokens if changed_cap and cap is not None else None,
                model=route.model if route is not None else None,
                layout=parsed.layout,
            )
        self.metrics.check.observe(time.perf_counter() - started)
        return admission

    async def _reserve(
        self,
        admission: Admission,
        policy: Policy,
        rules: TenantPolicy,
        parsed: ParsedRequest,
        prompt: int,
        cap: caps.Cap | None,
        soft: schema.SoftCap | None,
        now: float,
    ) -> caps.Cap | None:
        """Reserve the budget and pass the rate limits; sets ``admission.rejection`` when refused."""
        tenant, model = admission.tenant, admission.model
        budget, rate = rules.budget, rules.rate_limit
        n = parsed.n
        generation = cap.max_tokens * n if cap is not None else 0
        price = policy.price(model or "")
        cost = budgets.cost(budget, price, prompt, generation)
        least = 0
        if budget.on_shortfall == SHORTEN and cap is not None:
            least = budgets.cost(budget, price, prompt, min(budget.min_tokens, cap.max_tokens) * n)
        factor = soft.rate_factor if soft is not None else 1.0
        tenant_limit = model_limit = None
        if rate.tokens_per_minute is not None:
            tenant_limit = ratelimit.Limit.of(rate.tokens_per_minute, rate.burst_seconds, factor)
        model_tpm = rate.per_model.get(model) if model is not None else None
        if model_tpm is not None:
            model_limit = ratelimit.Limit.of(model_tpm, rate.burst_seconds, factor)
        wide = policy.model_limits.get(model) if model is not None else None
        wide_limit = ratelimit.Limit.of(wide.tokens_per_minute, wide.burst_seconds) if wide else None
        day, month = budgets.periods(now)
        # Local keys (fail-open): the tenant, the tenant and model, and the model ("\1").
        limits = [(tenant, tenant_limit)] if tenant_limit else []
        if model_limit:
            limits.append((f"{tenant}\0{model}", model_limit))
        if wide_limit:
            limits.append((f"\1{model}", wide_limit))
        ticket = Ticket(
            id=f"{self._id}.{next(self._ids):x}",  # unique: a random prefix per sidecar
            keys=tenant_keys(policy.scope, tenant, day, month, model if model_limit else None),
            tenant=tenant,
            day=day,
            month=month,
            budget=budget,
            price=price,
            tenant_interval=tenant_limit.interval_ms if tenant_limit else 0.0,
            model_interval=model_limit.interval_ms if model_limit else 0.0,
            cost=cost,
            reserved=True,
            tokens=prompt + generation,
            limits=limits,
            wide_key=model_rate_key(policy.scope, model) if wide_limit and model else None,
            wide_interval=wide_limit.interval_ms if wide_limit else 0.0,
        )
        if policy.chunks.enabled and self._from_chunk(
            admission, ticket, (tenant_limit, model_limit, wide_limit)
        ):
            return cap
        reply: Admitted | None = None
        wide_reply: ModelAdmitted | None = None
        sent = not self._down  # the scripts may run, whatever becomes of their replies
        if sent:
            if self._outbox:  # the settlements waiting ride along in the same write
                self._send_outbox()
            try:
                async with self.guard.round_trip(policy.redis_timeout_s):
                    reply, wide_reply = await self._ask(
                        ticket, least, (tenant_limit, model_limit, wide_limit)
                    )
            except _REDIS_ERRORS as exc:
                self._failed("admit", exc)
            except asyncio.CancelledError:
                # The client went away while Redis decided: release what may be reserved.
                self._release(ticket)
                raise
        if reply is None:
            return self._without_redis(admission, rules, ticket, cap, now, sent)
        self._noted(reply, ticket)
        if self._refused(ticket, reply, wide_reply):
            if reply.status == Admit.BUDGET:
                self._refuse_budget(admission, rules, reply.day_used, reply.month_used, now)
            else:
                self._refused_one(admission, reply, wide_reply, tenant_limit, model_limit, wide_limit)
            return cap
        for limit, reset in _resets((tenant_limit, model_limit, wide_limit), reply, wide_reply):
            remaining = int((limit.tau_ms - reset) / limit.interval_ms)  # the last (tenant's) wins
            admission.headers.update(ratelimit.headers(limit, remaining, reset))
        ticket.cost = reply.granted
        admission.ticket = ticket
        self._open[ticket.id] = ticket
        self.metrics.admissions.labels("redis").inc()
        if cap is not None and reply.granted < cost:
            allowed = budgets.generation_allowed(budget, price, reply.granted, prompt, n)
            cap = caps.shortened(cap, max(1, allowed))
        return cap

    async def _ask(
        self,
        ticket: Ticket,
        least: int,
        limits: tuple[ratelimit.Limit | None, ...],
        *,
        waiting: bool = True,
    ) -> tuple[Admitted, ModelAdmitted | None]:
        """Reserve ``ticket`` in Redis: ADMIT, and the model's limit across tenants in the same
        write (at once when a request is ``waiting`` on it)."""
        tenant_limit, model_limit, wide_limit = limits
        budget = ticket.budget
        taken = None
        if wide_limit is not None and ticket.wide_key is not None:
            taken = self.store.model_rate(
                ticket.wide_key, ticket.tokens, wide_limit.interval_ms, wide_limit.tau_ms
            )
        admitted = self.store.admit(
            ticket.keys,
            id=ticket.id,
            cost=ticket.cost,
            day_limit=budget.daily or 0,
            month_limit=budget.monthly or 0,
            least=least,
            tokens=ticket.tokens,
            tenant_rate=(ticket.tenant_interval, tenant_limit.tau_ms if tenant_limit else 0.0),
            model_rate=(ticket.model_interval, model_limit.tau_ms if model_limit else 0.0),
            lease_ms=int(self.policy.lease_s * 1000),
            day=ticket.day,
            month=ticket.month,
            flush=waiting,
        )
        if taken is None:
            return await admitted, None
        reply, wide_reply = await asyncio.gather(admitted, taken)  # both in one write
        return reply, wide_reply

    def _noted(self, reply: Admitted, ticket: Ticket) -> None:
        """What every admission reply tells: Redis' clock, leases that ended, the budget used."""
        self._offset_s = reply.redis_time_ms / 1000 - self._clock()
        self._synced = True
        if reply.expired:
            self.metrics.expired.labels(self._label(ticket.tenant)).inc(reply.expired)
            log.warning(
                "released %d reservation(s) of tenant %s whose lease ended (a sidecar that died "
                "mid-request, or one stalled past reservationLeaseSeconds)",
                reply.expired,
                ticket.tenant,
            )
        self._saw(ticket, reply.day_used, reply.month_used)

    # -- chunks: reserved ahead, drawn from locally (chunks.py)

    def _from_chunk(
        self, admission: Admission, ticket: Ticket, limits: tuple[ratelimit.Limit | None, ...]
    ) -> bool:
        """Admit from a chunk when one has room (no round trip); ask for the next one when due."""
        now = time.monotonic()
        key = (
            *ticket.keys,
            ticket.tenant_interval,
            ticket.model_interval,
            ticket.wide_key,
            ticket.wide_interval,
        )
        demand = self._chunks.seen(key, now, ticket.cost, ticket.tokens)
        retirements = self._chunks.retirements
        chunk = self._chunks.draw(key, ticket.tenant, ticket.cost, ticket.tokens, now, demand)
        if not self._down and not self._closing:
            self._ask_ahead(key, demand, ticket, limits, now)
        if self._chunks.retirements != retirements:
            if chunk is None:
                # Retired just now: what it did not use goes back in the write of this
                # request's own admission, ahead of it.
                self._send_checkpoints()
            else:
                self._soon()
        if chunk is None:
            return False
        ticket.chunk = chunk
        admission.ticket = ticket
        admission.headers.update(chunk.remaining_headers(now))
        self.metrics.admissions.labels("chunk").inc()
        return True

    def _ask_ahead(
        self,
        key: chunks.Key,
        demand: chunks.Demand,
        template: Ticket,
        limits: tuple[ratelimit.Limit | None, ...],
        now: float,
    ) -> None:
        if not self._chunks.may_ask(key, now):
            return
        last = self._chunks.targets.get(key)
        if last is not None and not self._chunks.wants(key, last, now):
            return  # plenty left by the last sizing: the demand need not be sized again
        rules = self.policy.chunks
        target = chunks.size(
            demand,
            now,
            seconds=rules.seconds,
            min_rps=rules.min_requests_per_second,
            budget_left=self._budget_left(template),
            bursts=[limit.tau_ms / limit.interval_ms for limit in limits if limit is not None],
            peers=self._peers,
        )
        if target is None:
            self._chunks.targets.pop(key, None)
            return
        self._chunks.targets[key] = target
        if not self._chunks.wants(key, target, now):
            return
        self._chunks.taking.add(key)
        task = asyncio.create_task(self._take(key, template, limits, target, self._generation))
        self._takes.add(task)
        task.add_done_callback(self._takes.discard)

    def _budget_left(self, ticket: Ticket) -> int | None:
        """What the tenant had left when last seen (0 before any reply: no chunk blind)."""
        budget = ticket.budget
        if not budget.enabled:
            return None
        seen = self._last_used(ticket.tenant, ticket.day, ticket.month)
        if seen is None:
            return 0
        left = []
        if budget.daily:
            left.append(budget.daily - seen[0])
        if budget.monthly:
            left.append(budget.monthly - seen[1])
        return min(left) if left else None

    async def _take(
        self,
        key: chunks.Key,
        template: Ticket,
        limits: tuple[ratelimit.Limit | None, ...],
        target: chunks.Size,
        generation: int,
    ) -> None:
        """Reserve a chunk: ADMIT (and the model's limit across tenants) for ``target``."""
        ticket = dataclasses.replace(
            template,
            id=f"{self._id}.{next(self._ids):x}",
            cost=target.cost,
            tokens=target.tokens,
            reserved=True,
            limits=[],
            chunk=None,
        )
        asked = time.monotonic()
        try:
            async with asyncio.timeout(self._background_timeout_s):
                reply, wide_reply = await self._ask(ticket, target.least, limits, waiting=False)
        except _REDIS_ERRORS as exc:
            self._failed("chunk", exc)
            self._release(ticket)
            self._chunks.backoff[key] = time.monotonic() + chunks.BACKOFF_S
            return
        except asyncio.CancelledError:
            self._release(ticket)
            raise
        finally:
            self._chunks.taking.discard(key)
        if self._refused(ticket, reply, wide_reply):
            # A limit is near: requests reserve alone for a while (exact, one round trip each).
            self._chunks.backoff[key] = time.monotonic() + chunks.BACKOFF_S
            self.metrics.chunks.labels("refused").inc()
            self._noted(reply, ticket)
            return
        asked_tokens = ticket.tokens
        if reply.granted < ticket.cost:  # the script scales the tokens alike
            ticket.tokens = math.ceil(ticket.tokens * reply.granted / ticket.cost)
        ticket.cost = reply.granted
        now = time.monotonic()
        chunk = chunks.Chunk(
            ticket,
            ticket.cost,
            ticket.tokens,
            _resets(limits, reply, wide_reply),
            now,
            now,
            asked_tokens if ticket.wide_key else 0,
            until=asked + self._draw_window_s,
            checkpoint_s=target.checkpoint_s,
            age_s=target.age_s,
        )
        if self._chunks.succeeded(key, now):
            self._soon()  # what the old one did not use goes back
        self._chunks.add(key, chunk)
        self.metrics.chunks.labels("taken").inc()
        if generation != self._generation or self._closing:
            self._chunks.retire(chunk)  # asked for under a policy no longer in force
            self._soon()
        self._noted(reply, ticket)

    def _send_checkpoints(self) -> None:
        """Queue the state of the chunks that changed now (in the write of whatever is sent
        next); their replies are awaited apart."""
        if not self._chunks or self._down:
            return
        now = time.monotonic()
        dirty, due = self._chunks.dirty(now)
        if due < self._checkpoint_due:  # the others wait for their turn (those due together
            # within a linger go in one write), not in a busy loop
            if self._checkpoint_timer is not None:
                self._checkpoint_timer.cancel()
            self._checkpoint_due = due
            self._checkpoint_timer = asyncio.get_running_loop().call_later(
                max(due - now, SETTLE_LINGER_S), self._checkpoints_due
            )
        for start in range(0, len(dirty), BATCH):
            batch = [self._state(chunk) for chunk in dirty[start : start + BATCH]]
            sent = self.store.checkpoint_many([state.item for state in batch])
            task = asyncio.create_task(self._checkpointed(batch, sent))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _checkpoints_due(self) -> None:
        self._checkpoint_timer, self._checkpoint_due = None, math.inf
        self._send_checkpoints()

    def _state(self, chunk: chunks.Chunk) -> _Checkpoint:
        """A chunk's state as a checkpoint (and the correction of the model's limit across
        tenants, its own slot, sent with it)."""
        chunk.seq += 1
        held = chunk.held()
        ticket = chunk.ticket
        charged = (chunk.real_cost, chunk.real_tokens)
        args = checkpoint_args(
            id=ticket.id,
            seq=chunk.seq,
            held=held,
            charged=charged,
            daily=ticket.budget.daily is not None,
            monthly=ticket.budget.monthly is not None,
            tenant_interval=ticket.tenant_interval,
            model_interval=ticket.model_interval,
        )
        state = _Checkpoint(chunk, chunk.seq, (ticket.keys, args), charged, chunk.final, chunk.closing_sent)
        if held == (0, 0):
            # It closes the entry (set when sent: if its reply is lost, a loss of the chunk
            # by Redis goes unseen, and its usage since the last checkpoint with it).
            chunk.closing_sent = True
            self._chunks.retire(chunk)  # all drawn and ended: nothing more may be drawn
        if ticket.wide_key is not None:
            counted = held[1] + chunk.real_tokens
            if counted != chunk.wide_counted:
                moved = (counted - chunk.wide_counted) * ticket.wide_interval
                chunk.wide_counted = counted
                self._background(self.store.move(ticket.wide_key, moved))
        return state

    async def _batch_replies(
        self, op: str, sent: Awaitable[list[Settled | BaseException]], again: Callable[[], None]
    ) -> list[Settled | BaseException] | None:
        """The replies of a batch of settlements or checkpoints; None when Redis did not answer
        in time, after ``again`` put the batch back to be sent again (also when cancelled, at
        shutdown: nothing is lost)."""
        try:
            async with asyncio.timeout(self.policy.redis_timeout_s):
                return await sent
        except _REDIS_ERRORS as exc:
            self._failed(op, exc)
            again()
            return None
        except BaseException:
            again()
            raise

    async def _checkpointed(
        self, batch: list[_Checkpoint], sent: Awaitable[list[Settled | BaseException]]
    ) -> bool:
        """Apply the replies of a batch of checkpoints; a chunk whose checkpoint Redis did not
        take is sent again with the next (only the latest state counts)."""

        def again() -> None:
            for state in batch:
                state.chunk.dirty = True

        replies = await self._batch_replies("checkpoint", sent, again)
        if replies is None:
            return False
        failure: BaseException | None = None
        for state, reply in zip(batch, replies, strict=True):
            chunk, ticket = state.chunk, state.chunk.ticket
            if isinstance(reply, ResponseError) and _script_fault(reply):
                # It would fail again: said loudly; the chunk admits no more and is dropped once
                # its requests have ended (its lease releases what it holds).
                self.metrics.redis_errors.labels("checkpoint_script").inc()
                log.error(
                    "Redis refused the checkpoint of a chunk of tenant %s (charged %s tokens, cost %s): %s",
                    ticket.tenant,
                    chunk.real_tokens,
                    chunk.real_cost,
                    reply,
                )
                self._chunks.retire(chunk)
                if state.final:
                    self._chunks.forget(chunk)
                continue
            if isinstance(reply, BaseException):
                failure = reply
                chunk.dirty = True
                continue
            if reply.applied == Applied.NONE and not state.closed_before:
                self._lost(state)
                if state.final:
                    self._chunks.forget(chunk)
                continue
            elif reply.applied == Applied.RELEASED:
                log.warning(
                    "a chunk of tenant %s was released when its lease ended (this sidecar stalled "
                    "past reservationLeaseSeconds): its requests are charged in full",
                    ticket.tenant,
                )
                self._chunks.retire(chunk)
            if reply.applied and state.seq > chunk.acked_seq:
                chunk.acked, chunk.acked_seq = state.charged, state.seq
            if state.final:
                self._chunks.forget(chunk)
            self._saw(ticket, reply.day_used, reply.month_used)
        if failure is not None:
            self._failed("checkpoint", failure)
            return False
        return True

    def _lost(self, state: _Checkpoint) -> None:
        """Redis has no trace of a chunk it granted (a failover to a replica that missed it, a
        restart without persistence): no more draws from it, and its usage is charged without
        a reservation, once. Replication keeps order, so a Redis without the chunk's grant
        has none of its checkpoints either: all that was charged to it is charged again (a
        Redis that evicts keys would be charged twice for what it kept: run it with
        ``maxmemory-policy noeviction``)."""
        chunk = state.chunk
        ticket = chunk.ticket
        if state.seq <= chunk.lost_seq:
            return  # an older checkpoint's reply: the newer one charged it
        cost, tokens = state.charged[0] - chunk.lost_charged[0], state.charged[1] - chunk.lost_charged[1]
        if not chunk.lost_seq:
            self._chunks.retire(chunk)
            self.metrics.redis_errors.labels("chunk_lost").inc()
            log.error(
                "Redis lost a chunk of tenant %s (failover or restart?): it admits no more; "
                "its %s tokens (cost %s) are charged without it",
                ticket.tenant,
                tokens,
                cost,
            )
        chunk.lost_seq, chunk.lost_charged = state.seq, state.charged
        if cost:  # a charge without a reservation moves budgets only (as fail-open's do)
            unreserved = dataclasses.replace(
                ticket, id=f"{ticket.id}.{state.seq}", reserved=False, chunk=None, wide_key=None
            )
            self._local[ticket.tenant] = self._local.get(ticket.tenant, 0) + cost
            self._post(_Settlement(unreserved, cost, tokens, moved=True))

    def _refused(self, ticket: Ticket, reply: Admitted, wide_reply: ModelAdmitted | None) -> bool:
        """Whether the tenant's check or the model's across tenants refused; if one did, what
        the other took is given back."""
        wide_refused = wide_reply is not None and wide_reply.refused
        if reply.status == Admit.OK and not wide_refused:
            return False
        if reply.status == Admit.OK:  # the tenant's reservation went through: released with the next write
            self._post(_Settlement(ticket, 0, 0, moved=True))
        elif wide_reply is not None and not wide_refused:
            self._give_back(ticket)
        return True

    def _refused_one(
        self,
        admission: Admission,
        reply: Admitted,
        wide_reply: ModelAdmitted | None,
        tenant_limit: ratelimit.Limit | None,
        model_limit: ratelimit.Limit | None,
        wide_limit: ratelimit.Limit | None,
    ) -> None:
        """A rate limit refused: answer 429 (what the other check took is given back already)."""
        if reply.status != Admit.OK:
            per_model = reply.status != Admit.RATE_TENANT
            limit = model_limit if per_model else tenant_limit
            assert limit is not None
            which = _which(admission, PER_MODEL if per_model else TENANT)
            self._refuse_rate(admission, limit, which, reply.retry_after_ms, reply.reset_ms)
            return
        assert wide_reply is not None and wide_limit is not None
        self._refuse_rate(
            admission, wide_limit, _which(admission, WIDE), wide_reply.retry_after_ms, wide_reply.reset_ms
        )

    def _give_back(self, ticket: Ticket) -> None:
        """Return the tokens a refused request took from its model's limit across tenants."""
        assert ticket.wide_key is not None
        self._background(self.store.move(ticket.wide_key, -ticket.tokens * ticket.wide_interval))

    def _background(self, reply: Awaitable[Any]) -> None:
        """Await a reply off the request path; a failure only counts (what it fixes is a rate)."""

        async def wait() -> None:
            try:
                async with asyncio.timeout(self._background_timeout_s):
                    result = await reply
                if isinstance(result, ResponseError):  # error replies arrive as values
                    raise result
            except _REDIS_ERRORS as exc:
                self.metrics.redis_errors.labels("move").inc()
                # A script error says more than a connection lost (already said elsewhere).
                level = logging.WARNING if isinstance(exc, ResponseError) else logging.DEBUG
                log.log(level, "a model-wide rate limit correction was not applied: %r", exc)

        task = asyncio.create_task(wait())
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)

    def _refuse_rate(
        self, admission: Admission, limit: ratelimit.Limit, which: str, wait_ms: float, reset_ms: float
    ) -> None:
        self.metrics.rejections.labels(self._label(admission.tenant), "rate_limit").inc()
        admission.rejection = Rejection(
            429,
            "tokens",
            "rate_limit_exceeded",
            f"Rate limit reached for {which} on tokens per min (TPM): "
            f"Limit {limit.tokens_per_minute}. Please try again in {ratelimit.duration(wait_ms)}.",
            {**ratelimit.headers(limit, 0, reset_ms), **ratelimit.retry_headers(wait_ms)},
        )

    def _refuse_budget(
        self, admission: Admission, rules: TenantPolicy, day_used: int, month_used: int, now: float
    ) -> None:
        budget = rules.budget
        monthly = budget.monthly is not None and month_used >= budget.monthly
        period = "monthly" if monthly else "daily"
        self.metrics.rejections.labels(self._label(admission.tenant), "budget").inc()
        wait_s = _period_end(now, monthly)
        admission.rejection = Rejection(
            429,
            "insufficient_quota",
            "budget_exceeded",
            f"tenant {admission.tenant} has used its {period} {budget.unit} budget",
            {"Retry-After": str(max(1, int(wait_s)))},
        )

    def _release(self, ticket: Ticket) -> None:
        """Release a reservation the admission may have made though its reply never came.

        The model limit across tenants is left as it is: whether it took the tokens is not
        known, and giving back what it never took would loosen it.
        """
        self._queue(_Settlement(ticket, 0, 0, moved=True))

    def _without_redis(
        self,
        admission: Admission,
        rules: TenantPolicy,
        ticket: Ticket,
        cap: caps.Cap | None,
        now: float,
        sent: bool,
    ) -> caps.Cap | None:
        """Decide without Redis; ``sent``: an admission went out, its reply lost or late."""
        tenant = admission.tenant
        if rules.fail_mode == CLOSED:
            if sent:
                self._release(ticket)
            self.metrics.rejections.labels(self._label(tenant), "redis_unavailable").inc()
            admission.rejection = Rejection(
                503,
                "server_error",
                "policy_store_unavailable",
                "the token budget store is unreachable; try again shortly",
                {"Retry-After": "1"},
            )
            return cap
        budget = rules.budget
        used = self._last_used(tenant, ticket.day, ticket.month)
        local = self._local.get(tenant, 0)
        if budget.enabled and not failopen.fits_share(budget, used, local, ticket.cost, self._peers):
            if sent:
                self._release(ticket)
            seen = self._used.get(tenant)
            self._refuse_budget(
                admission,
                rules,
                seen.day_used if seen else 0,
                (seen.month_used if seen else 0) + self._local.get(tenant, 0),
                now,
            )
            return cap
        if ticket.limits:
            refused = self._local_rates.admit(ticket.limits, ticket.tokens, self._peers, now * 1000)
            if refused is not None:
                if sent:
                    self._release(ticket)
                index, wait = refused
                key, limit = ticket.limits[index]
                self._refuse_rate(admission, limit, _which(admission, _kind_of(key)), wait, wait)
                return cap
        ticket.reserved = False
        self._local[tenant] = self._local.get(tenant, 0) + ticket.cost
        admission.ticket = ticket
        self.metrics.fail_open.labels(self._label(tenant)).inc()
        self.metrics.admissions.labels("without_redis").inc()
        return cap

    # -- settlement

    def settle(self, admission: Admission, prompt: int, generation: int) -> None:
        """Settle at the real usage (0 after a failure before any token), off the request path.

        Settlements wait in an outbox; the next admission takes them along (queued just
        before it, they leave in the same write), or after ``SETTLE_LINGER_S`` they go on
        their own: under load, a request costs one round trip, not two.
        """
        ticket = admission.ticket
        if ticket is None:
            return
        admission.ticket = None
        cost = budgets.cost(ticket.budget, ticket.price, prompt, generation)
        if ticket.chunk is not None:  # charged to its chunk: the next checkpoint tells Redis
            self._chunks.end(ticket.chunk, ticket.cost, ticket.tokens, cost, prompt + generation)
            self._soon()
            return
        self._open.pop(ticket.id, None)
        if not ticket.reserved:
            self._local[ticket.tenant] = self._local.get(ticket.tenant, 0) + cost - ticket.cost
            self._local_rates.correct(ticket.limits, prompt + generation - ticket.tokens, self._peers)
        settlement = _Settlement(ticket, cost, prompt + generation)
        if self._down:
            self._queue(settlement)
            return
        self._post(settlement)

    def _post(self, settlement: _Settlement) -> None:
        """Into the outbox: sent with the next admission, or after ``SETTLE_LINGER_S``."""
        self._outbox.append(settlement)
        self._soon()

    def _soon(self) -> None:
        """Send the outbox and the chunks' checkpoints within ``SETTLE_LINGER_S``."""
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(SETTLE_LINGER_S, self._send_outbox)

    @property
    def settling(self) -> bool:
        """Settlements (or chunks' checkpoints) are on their way to Redis."""
        return (
            bool(self._outbox)
            or bool(self._inflight)
            or self._linger is not None
            or self._checkpoint_timer is not None
        )

    def _send_outbox(self) -> None:
        """Queue the outbox's settlements on the channel now; their replies are awaited apart."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        outbox, self._outbox = self._outbox, []
        if self._down:
            for settlement in outbox:
                self._queue(settlement)
            return
        self._send_checkpoints()
        for start in range(0, len(outbox), BATCH):
            task = asyncio.create_task(self._send(outbox[start : start + BATCH]))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _send(self, batch: list[_Settlement]) -> Coroutine[Any, Any, bool]:
        """Queue a batch's settlements (and model-limit corrections) on the channel now; the
        coroutine returned applies their replies."""
        self._move(batch)
        return self._settled(batch, self.store.settle_many(self._items(batch)))

    def _move(self, batch: list[_Settlement]) -> None:
        """Correct the model limits across tenants to the real tokens, once per settlement."""
        for settlement in batch:
            ticket = settlement.ticket
            if settlement.moved or ticket.wide_key is None or not ticket.reserved:
                continue
            settlement.moved = True
            delta = settlement.tokens - ticket.tokens
            if delta:
                self._background(self.store.move(ticket.wide_key, delta * ticket.wide_interval))

    @staticmethod
    def _items(batch: list[_Settlement]) -> list[Item]:
        items = []
        for s in batch:
            ticket = s.ticket
            args = settle_args(
                id=ticket.id,
                cost=s.cost,
                tokens=s.tokens,
                daily=ticket.budget.daily is not None,
                monthly=ticket.budget.monthly is not None,
                tenant_interval=ticket.tenant_interval,
                model_interval=ticket.model_interval,
                unreserved=not ticket.reserved,
            )
            items.append((ticket.keys, args))
        return items

    async def _settled(
        self, batch: list[_Settlement], sent: Awaitable[list[Settled | BaseException]]
    ) -> bool:
        """Apply the replies of a batch of settlements; those Redis did not take wait in the
        queue (sent again: settling is idempotent)."""

        def again() -> None:
            for settlement in batch:
                self._queue(settlement)

        replies = await self._batch_replies("settle", sent, again)
        if replies is None:
            return False
        failure: BaseException | None = None
        for settlement, settled in zip(batch, replies, strict=True):
            ticket = settlement.ticket
            if isinstance(settled, ResponseError) and _script_fault(settled):
                # The script itself failed (a key of the wrong type, say): sending it again
                # would fail again. Said loudly, with what was not charged.
                self._forget_local(settlement)
                self.metrics.redis_errors.labels("settle_script").inc()
                log.error(
                    "Redis refused the settlement of a request of tenant %s (%s tokens, cost %s): %s",
                    ticket.tenant,
                    settlement.tokens,
                    settlement.cost,
                    settled,
                )
                continue
            if isinstance(settled, BaseException):
                # A lost connection, or Redis refusing for now (LOADING, BUSY, READONLY after a
                # failover, OOM): sent again once it answers.
                failure = settled
                self._queue(settlement)
                continue
            if settled.applied == Applied.RELEASED:
                log.warning(
                    "request of tenant %s settled after its lease ended and its reservation was "
                    "released: charged in full (raise reservationLeaseSeconds if this sidecar stalls)",
                    ticket.tenant,
                )
            self._forget_local(settlement)
            self._saw(ticket, settled.day_used, settled.month_used)
        if failure is not None:
            self._failed("settle", failure)
            return False
        return True

    def _forget_local(self, settlement: _Settlement) -> None:
        """A fail-open request's cost is in Redis now (or never will be): not local any more."""
        ticket = settlement.ticket
        if ticket.reserved:
            return
        left = self._local.get(ticket.tenant, 0) - settlement.cost
        if left > 0:
            self._local[ticket.tenant] = left
        else:
            self._local.pop(ticket.tenant, None)

    def _queue(self, settlement: _Settlement) -> None:
        if len(self._pending) >= MAX_PENDING:
            lost = self._pending.popleft()
            self._forget_local(lost)
            log.error(
                "settlement queue full: dropped the settlement of a request of tenant %s (%s tokens)",
                lost.ticket.tenant,
                lost.tokens,
            )
        self._pending.append(settlement)
        self.metrics.pending.set(len(self._pending))

    @property
    def _announces(self) -> bool:
        """Sidecars count each other when they share a limit: a rate limit's share while Redis
        is away, and a chunk's share of a budget or burst."""
        return self.policy.rate_limited or self.policy.chunks.enabled

    @property
    def _renew_every_s(self) -> float:
        """A third of the lease; with chunks, often enough that a chunk's draw window (half
        the lease) is pushed on before it ends, a tick and a call's timeout included."""
        every = self.policy.lease_s / 3
        if self.policy.chunks.enabled:
            every = min(every, self._draw_window_s - self._tick_s - self._background_timeout_s)
        return max(0.0, every)

    @property
    def _draw_window_s(self) -> float:
        """How long after its grant (or the last renewal Redis confirmed) a chunk admits: half
        its lease, so no other sidecar can have released it meanwhile, whatever happens to Redis."""
        return self.policy.lease_s / 2

    @property
    def _background_timeout_s(self) -> float:
        """Calls off the request path (pings, renewals, corrections) may wait a little longer."""
        return max(self.policy.redis_timeout_s, 1.0)

    def _failed(self, op: str, exc: BaseException) -> None:
        if op != "admit" and self.guard.excuses(exc, self._background_timeout_s):
            self.metrics.loop_stalls.labels(op).inc()  # the loop was held, not Redis
            return
        self.metrics.redis_errors.labels(op).inc()
        if isinstance(exc, TimeoutError):
            # No reply in time: the peer may be gone without a reset. A new connection
            # finds out; the replies still owed on this one fail now.
            self.store.channel.reset()
        if not self._down:
            log.warning("policy store (Redis) unreachable, deciding without it until it answers: %r", exc)
        self._down = True

    # -- background

    async def tick(self) -> None:
        if self.reload():
            self._generation += 1
            self._chunks.retire_all()  # limits may have changed: what they hold comes back
        if self._chunks:
            self._chunks.expire(time.monotonic(), self.policy.chunks.seconds)
        timeout = self.policy.redis_timeout_s
        if self._down:
            try:
                await asyncio.wait_for(self.store.ping(), self._background_timeout_s)
            except TimeoutError:
                self.store.channel.reset()  # a connection that takes commands and never answers
                return
            except _REDIS_ERRORS:
                return
            self._down = False
            log.info("policy store (Redis) reachable again; reconciling %d settlements", len(self._pending))
        while self._pending and not self._down:
            batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            if not await self._send(batch):
                # _settled queued them again at the back: order does not matter, each is idempotent.
                break
        self.metrics.pending.set(len(self._pending))
        self._send_checkpoints()
        if not self._synced:
            await self._sync_clock()
        if self._announces and time.monotonic() - self._announced >= ANNOUNCE_S:
            await self._announce()
        if (
            (self._open or self._chunks)
            and not self._down
            and time.monotonic() - self._renewed >= self._renew_every_s
        ):
            await self._renew()
        if self.policy.watches_saturation:
            try:
                raw = await asyncio.wait_for(self.store.get(saturation_key(self._workload)), timeout)
            except _REDIS_ERRORS as exc:
                self._failed("saturation", exc)
                return
            self.saturation = decode(raw, int(self._clock() * 1000))
            self.metrics.saturated.set(1 if self.saturation.saturated else 0)

    async def _sync_clock(self) -> None:
        """Redis' clock before the first admission: its replies keep the offset after that."""
        try:
            redis_now = await asyncio.wait_for(self.store.time(), self._background_timeout_s)
        except _REDIS_ERRORS as exc:
            self._failed("time", exc)
            return
        self._offset_s = redis_now - self._clock()
        self._synced = True

    async def _announce(self) -> None:
        try:
            async with asyncio.timeout(self._background_timeout_s):
                peers = await self.store.announce(self.policy.scope, self._id)
        except _REDIS_ERRORS as exc:
            self._failed("presence", exc)
            return
        self._announced = time.monotonic()
        if peers != self._peers:
            log.info("%d sidecars share the rate limits of scope %s", peers, self.policy.scope)
        self._peers = max(1, peers)

    async def _renew(self) -> None:
        """Push the leases of the reservations in flight (a script per tenant, ``BATCH`` tenants
        a pipeline: with thousands of tenants holding chunks, one pipeline of all of them would
        hold the loop and could outlast its timeout)."""
        leases: dict[str, list[str]] = {}
        held = {chunk.ticket.id: chunk for chunk in self._chunks}
        for ticket in [*self._open.values(), *(chunk.ticket for chunk in held.values())]:
            leases.setdefault(ticket.keys.lease, []).append(ticket.id)
        keys = list(leases)
        for start in range(0, len(keys), BATCH):
            batch = {key: leases[key] for key in keys[start : start + BATCH]}
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self._background_timeout_s):
                    renewed = await self.store.renew(batch, int(self.policy.lease_s * 1000))
            except _REDIS_ERRORS as exc:
                self._failed("renew", exc)
                return
            for id in renewed:  # renewed no later than ``sent``: they may admit on (the others not)
                chunk = held.get(id)
                if chunk is not None:
                    chunk.until = max(chunk.until, sent + self._draw_window_s)
        self._renewed = time.monotonic()

    async def run(self) -> None:
        self.guard.start()
        while True:  # the first tick at once: it reads Redis' clock
            try:
                await self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("policy tick failed")
            await asyncio.sleep(self._tick_s)

    async def close(self, timeout_s: float) -> bool:
        """Wait for settlements in flight, then send what is queued; False if some remain."""
        self._closing = True
        self.guard.stop()
        for task in self._takes:  # a chunk asked for now would only be released again
            task.cancel()
        if self._takes:
            await asyncio.wait(set(self._takes), timeout=timeout_s)
        self._chunks.retire_all()  # their unused part goes back to the tenants
        self._send_outbox()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.tick(), timeout_s)
        if self._outbox:  # what the checkpoints' replies posted (a chunk Redis lost)
            self._send_outbox()
        if self._inflight:  # the checkpoints tick sent, and those
            await asyncio.wait(set(self._inflight), timeout=timeout_s)
        if self._announces and not self._down:
            with contextlib.suppress(*_REDIS_ERRORS):  # the others' share grows a minute sooner
                await asyncio.wait_for(self.store.leave(self.policy.scope, self._id), timeout_s)
        if self._checkpoint_timer is not None:  # what is left is said below
            self._checkpoint_timer.cancel()
            self._checkpoint_timer, self._checkpoint_due = None, math.inf
        left = list(self._chunks)
        if self._pending or self._outbox or left:
            log.warning(
                "not delivered to Redis at shutdown: %d policy settlements, %d chunks (their leases "
                "release what they hold: %d tokens charged to them since their last checkpoint are lost)",
                len(self._pending) + len(self._outbox),
                len(left),
                sum(chunk.real_tokens - chunk.acked[1] for chunk in left),
            )
        return not (self._pending or self._outbox or left)
