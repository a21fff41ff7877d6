"""The policy file: YAML -> a validated, immutable ``Policy`` (pure; the only I/O is reading the file).

Every error names the key path (``defaults.budget.daily: expected ...``), so a bad file
fails at start-up, or on reload keeps the old policy, with a message that says where.
Tenant sections are merged over ``defaults`` key by key (mappings merge, anything else
replaces), so a tenant states only what differs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from token_scaler.errors import ConfigError

# A max_tokens ceiling above this only for tenants named under ``tenants`` (opt-in).
CEILING_WITHOUT_OPT_IN = 1024
NANO = 10**9  # money is kept in billionths of the currency unit: integers in Redis and Lua
TENANT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_SHA256 = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")

CLAMP, REJECT = "clamp", "reject"
SHORTEN = "shorten"
MID_ERROR, MID_FINISH, MID_OFF = "error", "finish", "off"
OPEN, CLOSED = "open", "closed"
TOKENS, MONEY = "tokens", "money"
DOWNGRADE_ACTION, REFUSE_ACTION = "downgrade", "refuse"
GPU_UTIL, KV_CACHE, WAITING = "gpu_util", "kv_cache", "waiting"


@dataclass(frozen=True, slots=True)
class MaxTokens:
    default: int = 512
    ceiling: int = CEILING_WITHOUT_OPT_IN
    over_ceiling: str = CLAMP


@dataclass(frozen=True, slots=True)
class Budget:
    unit: str = TOKENS
    daily: int | None = None  # tokens, or billionths of the currency unit
    monthly: int | None = None
    on_shortfall: str = REJECT  # the full reservation does not fit: reject, or shorten max_tokens
    min_tokens: int = 16  # shorten: fewest generated tokens per choice worth sending
    mid_stream: str = MID_ERROR  # a stream past its reservation: end it with an error event, finish, off

    @property
    def enabled(self) -> bool:
        return self.daily is not None or self.monthly is not None


@dataclass(frozen=True, slots=True)
class RateLimit:
    tokens_per_minute: int | None = None
    per_model: Mapping[str, int] = field(default_factory=dict)
    burst_seconds: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.tokens_per_minute is not None or bool(self.per_model)


@dataclass(frozen=True, slots=True)
class ModelLimit:
    """Tokens per minute of one model, all tenants together (what its replicas can serve)."""

    tokens_per_minute: int
    burst_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class SoftCap:
    at: float  # share of a budget used
    max_tokens: int | None = None
    rate_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    max_tokens: MaxTokens = MaxTokens()
    budget: Budget = Budget()
    rate_limit: RateLimit = RateLimit()
    soft_caps: tuple[SoftCap, ...] = ()  # ascending by ``at``
    keep_model: bool = False  # whitelisted: never downgraded
    fail_mode: str = OPEN

    @property
    def needs_redis(self) -> bool:
        return self.budget.enabled or self.rate_limit.enabled


@dataclass(frozen=True, slots=True)
class Price:
    prompt: int  # billionths of the currency unit per 1k tokens
    generation: int
    cache_read: int | None = None  # input read from a prompt cache; None: at ``prompt``
    cache_write: int | None = None  # input written to a prompt cache; None: at ``prompt``

    @property
    def input_prices(self) -> tuple[int, int, int]:
        """Uncached, cache-read and cache-written input, per 1k tokens."""
        read = self.prompt if self.cache_read is None else self.cache_read
        write = self.prompt if self.cache_write is None else self.cache_write
        return self.prompt, read, write


@dataclass(frozen=True, slots=True)
class Threshold:
    """One model-server signal of ``whenBusy``: above ``above`` counts as busy, below ``below`` as calm."""

    signal: str  # GPU_UTIL (0-1), KV_CACHE (0-1) or WAITING (requests)
    above: float
    below: float


@dataclass(frozen=True, slots=True)
class Busy:
    """``whenBusy``: the rule applies after ``enter_s`` with a signal above its threshold, and
    stops after ``leave_s`` with every signal below its lower one (hysteresis)."""

    thresholds: tuple[Threshold, ...]
    enter_s: float = 600.0
    leave_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Downgrade:
    model: str
    to: str
    upstream: str | None = None
    at: float | None = None  # budget share that triggers it
    when_saturated: bool = False
    when_busy: Busy | None = None


@dataclass(frozen=True, slots=True)
class SpendGuard:
    """The scope's spend per UTC hour (all tenants) and what happens as it fills."""

    per_hour: int  # billionths of the currency unit
    at: float = 0.8  # from this share: ``action`` on the models that have a downgrade rule
    action: str = DOWNGRADE_ACTION  # downgrade | refuse


@dataclass(frozen=True, slots=True)
class ChunkPolicy:
    """Reserving ahead (chunks.py): ``seconds`` of a tenant's traffic at a time, 0: never."""

    seconds: float = 1.0
    min_requests_per_second: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.seconds > 0


@dataclass(frozen=True)
class Policy:
    scope: str = "default"
    tenant_header: str | None = None  # None: the sidecar's --tenant-header
    api_keys: Mapping[str, str] = field(default_factory=dict)  # sha256 hex -> tenant
    default_tenant: str = "default"
    prices: Mapping[str, Price] = field(default_factory=dict)
    downgrades: Mapping[str, Downgrade] = field(default_factory=dict)
    model_limits: Mapping[str, ModelLimit] = field(default_factory=dict)  # model as sent upstream
    defaults: TenantPolicy = TenantPolicy()
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)
    redis_timeout_s: float = 0.25
    lease_s: float = 60.0  # a reservation not renewed for this long is released
    chunks: ChunkPolicy = ChunkPolicy()
    spend_guard: SpendGuard | None = None

    def tenant(self, name: str) -> TenantPolicy:
        return self.tenants.get(name, self.defaults)

    def price(self, model: str) -> Price:
        """The model's price; ``*``, else the dearest listed: an unpriced model is never free."""
        found = self.prices.get(model) or self.prices.get("*")
        if found is not None:
            return found
        if not self.prices:
            return Price(0, 0)
        return max(self.prices.values(), key=lambda p: p.prompt + p.generation)

    @property
    def rate_limited(self) -> bool:
        tenants = (self.defaults, *self.tenants.values())
        return bool(self.model_limits) or any(rules.rate_limit.enabled for rules in tenants)

    @property
    def watches_saturation(self) -> bool:
        return any(rule.when_saturated for rule in self.downgrades.values())

    @property
    def watches_busy(self) -> bool:
        return any(rule.when_busy is not None for rule in self.downgrades.values())


# -- validation helpers: each takes the key path it reads, for the message


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _mapping(path: str, value: object, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise _fail(path, f"keys must be strings, got {key!r}")
        if allowed is not None and key not in allowed:
            raise _fail(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


def _int(path: str, value: object, *, low: int = 1, high: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise _fail(path, f"expected a whole number from {low} to {high}, got {value}")
    return value


def _number(path: str, value: object, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"expected a number, got {value!r}")
    number = float(value)
    if not (low <= number <= high) or math.isnan(number) or math.isinf(number):
        raise _fail(path, f"expected a finite number from {low:g} to {high:g}, got {value!r}")
    return number


def _choice(path: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(path, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {value!r}")
    return value


def _name(path: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected a non-empty string, got {value!r}")
    return value


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- sections

_MAX_TOKENS_KEYS = frozenset({"default", "ceiling", "overCeiling"})
_BUDGET_KEYS = frozenset({"unit", "daily", "monthly", "onShortfall", "minTokens", "midStream"})
_RATE_KEYS = frozenset({"tokensPerMinute", "perModel", "burstSeconds"})
_SOFT_KEYS = frozenset({"atBudgetRatio", "maxTokens", "rateFactor"})
_TENANT_KEYS = frozenset({"maxTokens", "budget", "rateLimit", "softCaps", "keepModel", "failMode"})
_TOP_KEYS = frozenset(
    {
        "version",
        "scope",
        "identity",
        "prices",
        "downgrade",
        "defaults",
        "tenants",
        "redisTimeoutMs",
        "reservationLeaseSeconds",
        "modelLimits",
        "reservationChunks",
        "spendGuard",
    }
)
_CHUNK_KEYS = frozenset({"seconds", "minRequestsPerSecond"})
_IDENTITY_KEYS = frozenset({"tenantHeader", "apiKeys", "defaultTenant"})
_PRICE_KEYS = frozenset({"prompt", "generation", "cacheRead", "cacheWrite", "per"})
_PRICE_PER = (1000, 1_000_000)  # tokens a price is for: 1k (the default) or 1M (providers' lists)
_MODEL_LIMIT_KEYS = frozenset({"tokensPerMinute", "burstSeconds"})
_DOWNGRADE_KEYS = frozenset({"to", "upstream", "atBudgetRatio", "whenSaturated", "whenBusy"})
# whenBusy's signals: (key stem, signal, highest value)
_BUSY_SIGNALS = (("gpuUtil", GPU_UTIL, 1.0), ("kvCache", KV_CACHE, 1.0), ("waiting", WAITING, 1e6))
_BUSY_KEYS = frozenset(
    {"for", "leaveAfter"} | {stem + side for stem, _, _ in _BUSY_SIGNALS for side in ("Above", "Below")}
)
_SPEND_KEYS = frozenset({"perHour", "atSpendRatio", "action"})
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h)?$")


def _max_tokens(path: str, raw: object, opt_in: bool) -> MaxTokens:
    doc = _mapping(path, raw, _MAX_TOKENS_KEYS)
    ceiling = _int(f"{path}.ceiling", doc.get("ceiling", CEILING_WITHOUT_OPT_IN), high=10**7)
    if ceiling > CEILING_WITHOUT_OPT_IN and not opt_in:
        raise _fail(
            f"{path}.ceiling",
            f"{ceiling} is above {CEILING_WITHOUT_OPT_IN}: allowed only for tenants named under "
            "'tenants' (opt-in), not in defaults",
        )
    default = _int(f"{path}.default", doc.get("default", min(512, ceiling)), high=10**7)
    if default > ceiling:
        raise _fail(f"{path}.default", f"{default} is above the ceiling {ceiling}")
    over = _choice(f"{path}.overCeiling", doc.get("overCeiling", CLAMP), (CLAMP, REJECT))
    return MaxTokens(default, ceiling, over)


def _budget(path: str, raw: object) -> Budget:
    doc = _mapping(path, raw, _BUDGET_KEYS)
    unit = _choice(f"{path}.unit", doc.get("unit", TOKENS), (TOKENS, MONEY))
    limits: dict[str, int | None] = {}
    for key in ("daily", "monthly"):
        value = doc.get(key)
        if value is None:
            limits[key] = None
        elif unit == TOKENS:
            limits[key] = _int(f"{path}.{key}", value)
        else:
            limits[key] = max(1, round(_number(f"{path}.{key}", value, high=1e6) * NANO))
    return Budget(
        unit=unit,
        daily=limits["daily"],
        monthly=limits["monthly"],
        on_shortfall=_choice(f"{path}.onShortfall", doc.get("onShortfall", REJECT), (REJECT, SHORTEN)),
        min_tokens=_int(f"{path}.minTokens", doc.get("minTokens", 16)),
        mid_stream=_choice(
            f"{path}.midStream", doc.get("midStream", MID_ERROR), (MID_ERROR, MID_FINISH, MID_OFF)
        ),
    )


def _rate_limit(path: str, raw: object) -> RateLimit:
    doc = _mapping(path, raw, _RATE_KEYS)
    tpm = doc.get("tokensPerMinute")
    per_model = {
        _name(f"{path}.perModel", model): _int(f"{path}.perModel.{model}", value)
        for model, value in _mapping(f"{path}.perModel", doc.get("perModel")).items()
    }
    return RateLimit(
        tokens_per_minute=None if tpm is None else _int(f"{path}.tokensPerMinute", tpm),
        per_model=per_model,
        burst_seconds=_number(f"{path}.burstSeconds", doc.get("burstSeconds", 60.0), low=0.001, high=86400),
    )


def _model_limit(path: str, raw: object) -> ModelLimit:
    doc = _mapping(path, raw, _MODEL_LIMIT_KEYS)
    if "tokensPerMinute" not in doc:
        raise _fail(
            f"{path}.tokensPerMinute", "required: the model's tokens per minute, all tenants together"
        )
    return ModelLimit(
        tokens_per_minute=_int(f"{path}.tokensPerMinute", doc["tokensPerMinute"]),
        burst_seconds=_number(f"{path}.burstSeconds", doc.get("burstSeconds", 10.0), low=0.001, high=86400),
    )


def _soft_caps(path: str, raw: object) -> tuple[SoftCap, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(path, "expected a list of {atBudgetRatio, maxTokens, rateFactor}")
    caps = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        doc = _mapping(where, item, _SOFT_KEYS)
        if "atBudgetRatio" not in doc:
            raise _fail(f"{where}.atBudgetRatio", "required: the share of a budget used (0-1)")
        max_tokens = doc.get("maxTokens")
        caps.append(
            SoftCap(
                at=_number(f"{where}.atBudgetRatio", doc["atBudgetRatio"], high=1.0),
                max_tokens=None if max_tokens is None else _int(f"{where}.maxTokens", max_tokens),
                rate_factor=_number(f"{where}.rateFactor", doc.get("rateFactor", 1.0), low=0.001, high=1.0),
            )
        )
    return tuple(sorted(caps, key=lambda cap: cap.at))


def _tenant(path: str, doc: Mapping[str, Any], *, opt_in: bool) -> TenantPolicy:
    _mapping(path, doc, _TENANT_KEYS)
    policy = TenantPolicy(
        max_tokens=_max_tokens(f"{path}.maxTokens", doc.get("maxTokens"), opt_in),
        budget=_budget(f"{path}.budget", doc.get("budget")),
        rate_limit=_rate_limit(f"{path}.rateLimit", doc.get("rateLimit")),
        soft_caps=_soft_caps(f"{path}.softCaps", doc.get("softCaps")),
        keep_model=_bool(f"{path}.keepModel", doc.get("keepModel", False)),
        fail_mode=_choice(f"{path}.failMode", doc.get("failMode", OPEN), (OPEN, CLOSED)),
    )
    if policy.soft_caps and not policy.budget.enabled:
        raise _fail(f"{path}.softCaps", "soft caps act at shares of a budget: set budget.daily or monthly")
    return policy


def _price(path: str, raw: object) -> Price:
    if isinstance(raw, dict):
        doc = _mapping(path, raw, _PRICE_KEYS)
        per = doc.get("per", 1000)
        if per not in _PRICE_PER or isinstance(per, bool):
            raise _fail(f"{path}.per", f"expected 1000 or 1000000 (tokens the prices are for), got {per!r}")
        for key in ("prompt", "generation"):
            if key not in doc:
                raise _fail(f"{path}.{key}", f"required (money per {per} tokens)")
    else:
        doc, per = {"prompt": raw, "generation": raw}, 1000

    def nano(key: str) -> int | None:
        if doc.get(key) is None:
            return None
        number = _number(f"{path}.{key}", doc[key], high=1e6 * per / 1000)
        return round(number * NANO * 1000 / float(per))

    prompt, generation = nano("prompt"), nano("generation")
    assert prompt is not None and generation is not None
    return Price(prompt, generation, nano("cacheRead"), nano("cacheWrite"))


def _downgrade(path: str, model: str, raw: object) -> Downgrade:
    from token_scaler.config import http_url

    doc = _mapping(path, raw, _DOWNGRADE_KEYS)
    upstream = doc.get("upstream")
    if upstream is not None:
        try:
            upstream = http_url(_name(f"{path}.upstream", upstream))
        except ValueError as exc:
            raise _fail(f"{path}.upstream", str(exc)) from None
    at = doc.get("atBudgetRatio")
    busy = doc.get("whenBusy")
    rule = Downgrade(
        model=model,
        to=_name(f"{path}.to", doc.get("to")),
        upstream=upstream,
        at=None if at is None else _number(f"{path}.atBudgetRatio", at, high=1.0),
        when_saturated=_bool(f"{path}.whenSaturated", doc.get("whenSaturated", False)),
        when_busy=None if busy is None else _busy(f"{path}.whenBusy", busy),
    )
    return rule


def _duration(path: str, value: object) -> float:
    """Seconds: a number, or a string such as ``600s``, ``10m``, ``1h``."""
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match is None:
            raise _fail(path, f"expected seconds (600) or a duration such as 600s, 10m, 1h, got {value!r}")
        value = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    return _number(path, value, high=86_400)


def _busy(path: str, raw: object) -> Busy:
    doc = _mapping(path, raw, _BUSY_KEYS)
    thresholds = []
    for stem, signal, high in _BUSY_SIGNALS:
        above, below = doc.get(f"{stem}Above"), doc.get(f"{stem}Below")
        if above is None:
            if below is not None:
                raise _fail(
                    f"{path}.{stem}Below", f"needs {stem}Above (the threshold it is the lower one of)"
                )
            continue
        top = _number(f"{path}.{stem}Above", above, high=high)
        if top <= 0:
            raise _fail(f"{path}.{stem}Above", f"expected a number above 0, got {above!r}")
        low = 0.8 * top if below is None else _number(f"{path}.{stem}Below", below, high=high)
        if low >= top:
            raise _fail(
                f"{path}.{stem}Below", f"{below!r} is not below {stem}Above ({above!r}): no hysteresis"
            )
        thresholds.append(Threshold(signal, top, low))
    if not thresholds:
        raise _fail(path, "names no signal: set gpuUtilAbove, kvCacheAbove or waitingAbove")
    enter = _duration(f"{path}.for", doc.get("for", 600))
    return Busy(tuple(thresholds), enter, _duration(f"{path}.leaveAfter", doc.get("leaveAfter", enter / 2)))


def _spend_guard(
    path: str, raw: object, policy_prices: Mapping[str, Price], downgrades: Mapping[str, Downgrade]
) -> SpendGuard:
    doc = _mapping(path, raw, _SPEND_KEYS)
    if "perHour" not in doc:
        raise _fail(f"{path}.perHour", "required: the money the scope may spend per UTC hour")
    per_hour = _number(f"{path}.perHour", doc["perHour"], high=1e9)
    if per_hour <= 0:
        raise _fail(f"{path}.perHour", f"expected an amount of money above 0, got {doc['perHour']!r}")
    at = _number(f"{path}.atSpendRatio", doc.get("atSpendRatio", 0.8), high=1.0)
    if at <= 0:
        raise _fail(
            f"{path}.atSpendRatio", f"expected a share above 0 and at most 1, got {doc['atSpendRatio']!r}"
        )
    action = _choice(f"{path}.action", doc.get("action", DOWNGRADE_ACTION), (DOWNGRADE_ACTION, REFUSE_ACTION))
    if not policy_prices:
        raise _fail("prices", "required with spendGuard: a price per 1k tokens per model")
    if not downgrades:
        raise _fail(
            f"{path}.atSpendRatio",
            f"{at:g} acts on the models that have a downgrade rule, and 'downgrade' has none",
        )
    return SpendGuard(max(1, round(per_hour * NANO)), at, action)


def parse(data: object) -> Policy:
    """A loaded YAML document -> ``Policy``; ``ConfigError`` names the key path of a bad value."""
    doc = _mapping("policy", data, _TOP_KEYS)
    if doc.get("version", 1) != 1:
        raise _fail("version", f"expected 1, got {doc.get('version')!r}")
    scope = _name("scope", doc.get("scope", "default"))
    if not TENANT.match(scope):
        raise _fail("scope", "expected 1-128 characters of [A-Za-z0-9._:@-]")
    identity = _mapping("identity", doc.get("identity"), _IDENTITY_KEYS)
    header = identity.get("tenantHeader")
    default_tenant = _name("identity.defaultTenant", identity.get("defaultTenant", "default"))
    if not TENANT.match(default_tenant):
        raise _fail("identity.defaultTenant", "expected 1-128 characters of [A-Za-z0-9._:@-]")
    api_keys = _api_keys(_mapping("identity.apiKeys", identity.get("apiKeys")))
    prices = {
        _name("prices", model): _price(f"prices.{model}", raw)
        for model, raw in _mapping("prices", doc.get("prices")).items()
    }
    downgrades = {
        _name("downgrade", model): _downgrade(f"downgrade.{model}", model, raw)
        for model, raw in _mapping("downgrade", doc.get("downgrade")).items()
    }
    model_limits = {
        _name("modelLimits", model): _model_limit(f"modelLimits.{model}", raw)
        for model, raw in _mapping("modelLimits", doc.get("modelLimits")).items()
    }
    if doc.get("spendGuard") is None:
        _check_triggered(downgrades)
    defaults_doc = _mapping("defaults", doc.get("defaults"), _TENANT_KEYS)
    defaults = _tenant("defaults", defaults_doc, opt_in=False)
    tenants = _tenants(_mapping("tenants", doc.get("tenants")), defaults_doc)
    uses_money = any(t.budget.unit == MONEY for t in (defaults, *tenants.values()))
    if uses_money and not prices:
        raise _fail("prices", "required when a budget is in money: a price per 1k tokens per model")
    timeout_ms = doc.get("redisTimeoutMs", 250)
    return Policy(
        scope=scope,
        tenant_header=None if header is None else _name("identity.tenantHeader", header),
        api_keys=api_keys,
        default_tenant=default_tenant,
        prices=prices,
        downgrades=downgrades,
        model_limits=model_limits,
        defaults=defaults,
        tenants=tenants,
        redis_timeout_s=_int("redisTimeoutMs", timeout_ms, high=60_000) / 1000,
        lease_s=_int("reservationLeaseSeconds", doc.get("reservationLeaseSeconds", 60), low=2, high=86_400),
        chunks=_chunks(
            "reservationChunks", _mapping("reservationChunks", doc.get("reservationChunks"), _CHUNK_KEYS)
        ),
        spend_guard=None
        if doc.get("spendGuard") is None
        else _spend_guard("spendGuard", doc["spendGuard"], prices, downgrades),
    )


def _api_keys(doc: Mapping[str, Any]) -> dict[str, str]:
    """``identity.apiKeys``: the sha256 of each key (hex, lower case) -> its tenant."""
    api_keys: dict[str, str] = {}
    for digest, tenant in doc.items():
        # Only the key's hash is shown: a key pasted here by mistake must not reach the logs.
        match = _SHA256.match(digest.lower())
        if match is None:
            raise _fail(
                f"identity.apiKeys[#{len(api_keys) + 1}]",
                "expected the sha256 of the key as 64 hex digits (printf %s KEY | sha256sum), "
                "never the key itself",
            )
        where = f"identity.apiKeys.{match.group(1)[:12]}..."
        name = _name(where, tenant)
        if not TENANT.match(name):
            raise _fail(where, "expected a tenant name of 1-128 characters of [A-Za-z0-9._:@-]")
        api_keys[match.group(1)] = name
    return api_keys


def _check_triggered(downgrades: Mapping[str, Downgrade]) -> None:
    """Without a spend guard, every downgrade rule needs a trigger of its own."""
    for model, rule in downgrades.items():
        if rule.at is None and not rule.when_saturated and rule.when_busy is None:
            raise _fail(
                f"downgrade.{model}",
                "says none of atBudgetRatio, whenSaturated, whenBusy (and no spendGuard): "
                "it would never apply",
            )


def _tenants(doc: Mapping[str, Any], defaults_doc: Mapping[str, Any]) -> dict[str, TenantPolicy]:
    """``tenants``: each section over ``defaults``, opted in."""
    tenants: dict[str, TenantPolicy] = {}
    for name, raw in doc.items():
        if not TENANT.match(name):
            raise _fail(f"tenants.{name}", "expected a tenant name of 1-128 characters of [A-Za-z0-9._:@-]")
        section = _mapping(f"tenants.{name}", raw, _TENANT_KEYS)
        tenants[name] = _tenant(f"tenants.{name}", _merge(defaults_doc, section), opt_in=True)
    return tenants


def _chunks(path: str, doc: Mapping[str, Any]) -> ChunkPolicy:
    return ChunkPolicy(
        seconds=_number(f"{path}.seconds", doc.get("seconds", 1.0), high=60.0),
        min_requests_per_second=_number(
            f"{path}.minRequestsPerSecond", doc.get("minRequestsPerSecond", 0.1), low=0.1, high=1e6
        ),
    )


def load(path: Path) -> Policy:
    """Read, parse and validate a policy file; ``ConfigError`` names the file and the key path."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the policy file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
