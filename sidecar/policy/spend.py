"""The spend guard: the scope's spend per UTC hour, all tenants, and what it sets off.

Every request's real usage, priced at the model it was served by (``prices``), is added
to this sidecar's spend of the hour it ended in (hours on Redis' clock, as budget periods
are). Once a tick the sidecar sends what it added as a batch (``lua/spend.lua``: added once
per batch id, so a batch whose reply was lost is sent again under its id and never counted
twice) and reads the scope's total back. While Redis is away the batches wait; nothing is
dropped. The share of ``spendGuard.perHour`` used is what the sidecar last read plus what it
added since: other sidecars' spend shows here within a tick.

What the share sets off, for tenants without ``keepModel`` (``verdict``):

- from ``atSpendRatio``: requests for a model that has a downgrade rule are downgraded
  (``action: downgrade``, reason ``spend``) or refused (``action: refuse``);
- at 100 %: every request is refused (429 ``spend_limit_reached``) until the hour ends.

``keepModel`` tenants are never touched, so their spend can take the scope past 100 %.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from dataclasses import dataclass

from sidecar.policy import budgets
from sidecar.policy.context import Context
from sidecar.policy.failopen import Outage
from sidecar.policy.refusals import Rejection
from sidecar.policy.schema import MONEY, REFUSE_ACTION, Budget, Policy, SpendGuard, TenantPolicy
from sidecar.policy.store import Spent, spend_keys
from sidecar.policy.upkeep import RedisClock
from token_scaler.redis_conn import REDIS_ERRORS

HOUR_S = 3600
SPEND = "spend"  # the reason of a downgrade or a refusal
_MONEY = Budget(unit=MONEY)
# The actions of ``tokenscaler_policy_action_in_force`` the guard sets.
SPEND_DOWNGRADE, SPEND_REFUSE, SPEND_FULL = "spend_downgrade", "spend_refuse", "spend_refuse_all"


def hour_of(now: float) -> str:
    """The UTC hour (``2025013113``) a moment belongs to."""
    return _hour_name(int(now // HOUR_S))


@functools.lru_cache(maxsize=4)
def _hour_name(hour_number: int) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(hour_number * HOUR_S))


@dataclass(slots=True)
class Batch:
    id: str
    hour: str
    amount: int  # billionths of the currency unit


@dataclass(frozen=True, slots=True)
class Verdict:
    downgrade: bool = False  # route the model by its downgrade rule (reason ``spend``)
    rejection: Rejection | None = None


def refusal(guard: SpendGuard, ratio: float, now: float) -> Rejection:
    wait_s = HOUR_S - now % HOUR_S
    full = ratio >= 1.0
    what = "its hourly spend budget" if full else f"{guard.at:.0%} of its hourly spend budget"
    return Rejection(
        429,
        "insufficient_quota",
        "spend_limit_reached",
        f"this service has used {what}; "
        + ("try again next hour" if full else "this model is disabled until the hour ends"),
        {"Retry-After": str(max(1, int(wait_s)))},
        SPEND,
    )


def verdict(policy: Policy, rules: TenantPolicy, model: str | None, ratio: float, now: float) -> Verdict:
    """What the spend share ``ratio`` does to a request of a tenant with ``rules`` for ``model``."""
    guard = policy.spend_guard
    if guard is None or rules.keep_model or ratio < guard.at:
        return Verdict()
    if ratio >= 1.0:
        return Verdict(rejection=refusal(guard, ratio, now))
    if model is None or model not in policy.downgrades:
        return Verdict()
    if guard.action == REFUSE_ACTION:
        return Verdict(rejection=refusal(guard, ratio, now))
    return Verdict(downgrade=True)


def actions(guard: SpendGuard | None, ratio: float) -> set[str]:
    """The guard's actions in force at ``ratio``."""
    if guard is None or ratio < guard.at:
        return set()
    if ratio >= 1.0:
        return {SPEND_FULL}
    return {SPEND_REFUSE if guard.action == REFUSE_ACTION else SPEND_DOWNGRADE}


class SpendMeter:
    """This sidecar's view of the scope's spend this hour, and what it adds to it."""

    def __init__(self, ctx: Context, outage: Outage, redis_clock: RedisClock, prefix: str) -> None:
        self._ctx = ctx
        self._outage = outage
        self._redis_clock = redis_clock
        self._prefix = prefix
        self._ids = itertools.count()
        self._unsent: dict[str, int] = {}  # hour -> spend added, not in a batch yet
        self._batches: list[Batch] = []  # sent without a reply yet, or to be sent again
        self._seen: tuple[str, int] = ("", 0)  # hour, the scope's total last read
        self._lock = asyncio.Lock()
        self._shown = False  # the gauges were set

    @property
    def enabled(self) -> bool:
        return self._ctx.file.policy.spend_guard is not None

    def add(self, model: str | None, prompt: int, generation: int, cached: tuple[int, int] = (0, 0)) -> None:
        """A request ended: its real usage, priced at ``model`` (``cached``: the prompt tokens
        read from and written to a prompt cache), counts in this hour."""
        policy = self._ctx.file.policy
        if policy.spend_guard is None:
            return
        amount = budgets.cost(_MONEY, policy.price(model or ""), prompt, generation, cached)
        if amount > 0:
            hour = hour_of(self._redis_clock.now())
            self._unsent[hour] = self._unsent.get(hour, 0) + amount

    def spent(self) -> int:
        """The scope's spend this hour as this sidecar knows it."""
        hour = hour_of(self._redis_clock.now())
        seen_hour, total = self._seen
        mine = self._unsent.get(hour, 0) + sum(b.amount for b in self._batches if b.hour == hour)
        return (total if seen_hour == hour else 0) + mine

    def ratio(self) -> float:
        guard = self._ctx.file.policy.spend_guard
        return 0.0 if guard is None else self.spent() / guard.per_hour

    @property
    def unsent(self) -> int:
        """Spend added here that Redis has not confirmed."""
        return sum(self._unsent.values()) + sum(b.amount for b in self._batches)

    async def sync(self) -> bool:
        """Send the spend added since the last sync (and batches not confirmed), read the
        scope's total of this hour; False when Redis did not answer (sent again next time)."""
        policy = self._ctx.file.policy
        if policy.spend_guard is None or self._outage.down:
            return False
        async with self._lock:
            for hour, amount in self._unsent.items():
                self._batches.append(Batch(f"{self._prefix}.s{next(self._ids):x}", hour, amount))
            self._unsent = {}
            hour = hour_of(self._redis_clock.now())
            store, scope = self._ctx.store, policy.scope
            sent = [store.spend(spend_keys(scope, b.hour, b.id), b.amount) for b in self._batches]
            read = store.spend(spend_keys(scope, hour, "-"), 0)  # after the batches: includes them
            try:
                async with asyncio.timeout(self._ctx.file.background_timeout_s):
                    replies: list[Spent | BaseException] = await asyncio.gather(*sent, return_exceptions=True)
                    total = await read
            except REDIS_ERRORS as exc:
                self._outage.failed(SPEND, exc)
                return False
            self._batches = [
                b for b, r in zip(self._batches, replies, strict=True) if isinstance(r, BaseException)
            ]
            self._seen = (hour, total.total)
        self.show()
        return not self._batches

    def show(self) -> None:
        """The gauges of the spend as known now (all actions off once the guard is gone)."""
        policy = self._ctx.file.policy
        if policy.spend_guard is None and not self._shown:
            return
        self._shown = True
        metrics = self._ctx.metrics
        ratio = self.ratio()
        metrics.spend_ratio.labels(policy.scope).set(ratio)
        in_force = actions(policy.spend_guard, ratio)
        for action in (SPEND_DOWNGRADE, SPEND_REFUSE, SPEND_FULL):
            metrics.action_in_force.labels(action, policy.scope, "").set(1 if action in in_force else 0)
