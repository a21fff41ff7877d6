"""The price table and the cost model (pure: no I/O beyond reading the table's file).

The price table says what one replica of each workload costs per hour::

    currency: USD                     # optional; only shown
    instanceTypes:
      g5.xlarge:                      # any name; its parts are summed into $/hour
        instance: 1.006               # compute, on-demand or your negotiated rate
        storage: 0.0137               # disks attached to it, per hour
        network: 0.01                 # egress and load balancing, per hour
    workloads:
      llm/vllm: g5.xlarge             # <namespace>/<name> -> instance type
      llm/big:                        # or a mapping, when a replica is not one instance
        instanceType: p4d.24xlarge
        instancesPerReplica: 0.125    # one GPU of eight
    models:                           # for workloads not listed: the model they serve
      gemma-3-270m: g5.xlarge

The cost model (the mission text's)::

    hourly cost           = replicas x instancesPerReplica x (instance + storage + network)
    tokens per hour       = tokens/s x 3600
    cost per 1k tokens    = hourly cost / tokens per hour x 1000

Tokens are prompt + generated tokens, counted alike. Spend is shared out by tokens:
each model of a workload gets the share of the hourly cost that its tokens are of the
workload's, and each tenant of a model the share its tokens are of the model's. So
models served by the same pods show the same cost per 1k tokens; give a model pods of
its own (its own workload) to see what it costs alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from token_scaler.config import read_yaml
from token_scaler.errors import ConfigError
from token_scaler.record import validate_workload

PRICE_PARTS = ("instance", "storage", "network")
_TOP_KEYS = {"currency", "instanceTypes", "workloads", "models"}
_WORKLOAD_KEYS = {"instanceType", "instancesPerReplica"}


@dataclass(frozen=True)
class InstancePrice:
    name: str
    instance: float
    storage: float = 0.0
    network: float = 0.0

    @property
    def hourly(self) -> float:
        """$/hour of one instance, all parts included."""
        return self.instance + self.storage + self.network


@dataclass(frozen=True)
class Placement:
    """What one replica runs on."""

    instance_type: str
    instances_per_replica: float = 1.0


@dataclass(frozen=True)
class ReplicaPrice:
    """$/hour of one replica of a workload, and where the table says so."""

    hourly: float
    instance_type: str
    instances_per_replica: float
    source: str  # "workloads[...]" or "models[...]"


@dataclass
class PriceTable:
    instance_types: dict[str, InstancePrice] = field(default_factory=dict)
    workloads: dict[str, Placement] = field(default_factory=dict)
    models: dict[str, Placement] = field(default_factory=dict)
    currency: str = "USD"

    def replica_price(self, workload: str, models: Iterable[str] = ()) -> ReplicaPrice | str:
        """$/hour of one replica of ``workload``, or why the table has no price for it.

        The workload's own entry wins; else the entry of the models it serves, when they
        all run on the same instance type."""
        placement = self.workloads.get(workload)
        source = f"workloads[{workload!r}]"
        if placement is None:
            found = {m: self.models[m] for m in sorted(set(models)) if m in self.models}
            if not found:
                return (
                    f"workload {workload} is not in the price table (workloads, or models of what it serves)"
                )
            if len(set(found.values())) > 1:
                return (
                    f"the models of {workload} run on different instance types in the price table "
                    f"({', '.join(sorted(found))}): list the workload under workloads"
                )
            model, placement = next(iter(found.items()))
            source = f"models[{model!r}]"
        instance = self.instance_types[placement.instance_type]
        return ReplicaPrice(
            instance.hourly * placement.instances_per_replica,
            placement.instance_type,
            placement.instances_per_replica,
            source,
        )


# --- loading and validation --------------------------------------------------------


def load(path: Path) -> PriceTable:
    """Read and validate a price table file; ``ConfigError`` names the file and the key."""
    data = read_yaml(path, "price table")
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse(data: Any) -> PriceTable:
    """Validate a price table already parsed from YAML/JSON; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with instanceTypes and workloads (or models)")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
    currency = data.get("currency", "USD")
    if not isinstance(currency, str) or not currency.strip():
        raise ConfigError(f"currency: expected a currency code such as USD, got {currency!r}")

    raw_types = _mapping(data.get("instanceTypes"), "instanceTypes", required=True)
    types: dict[str, InstancePrice] = {}
    for name, parts in raw_types.items():
        where = f"instanceTypes[{name!r}]"
        parts = _mapping(parts, where, required=True)
        unknown = sorted(set(map(str, parts)) - set(PRICE_PARTS))
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}: unknown price part (allowed: {', '.join(PRICE_PARTS)}, in $/hour)"
            )
        if "instance" not in parts:
            raise ConfigError(f"{where}.instance: required ($/hour of the instance itself)")
        values = {p: _number(parts.get(p, 0.0), f"{where}.{p}") for p in PRICE_PARTS}
        types[str(name)] = InstancePrice(str(name), **values)

    def placements(section: str, check: Any) -> dict[str, Placement]:
        out: dict[str, Placement] = {}
        for key, value in _mapping(data.get(section), section, required=False).items():
            where = f"{section}[{key!r}]"
            check(str(key), where)
            out[str(key)] = _placement(value, where, types)
        return out

    def check_workload(key: str, where: str) -> None:
        try:
            validate_workload(key)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def check_model(key: str, where: str) -> None:
        if not key:
            raise ConfigError(f"{where}: a model name cannot be empty")

    workloads = placements("workloads", check_workload)
    models = placements("models", check_model)
    if not workloads and not models:
        raise ConfigError("workloads: required (or models): which instance type each workload runs on")
    return PriceTable(types, workloads, models, currency.strip())


def _mapping(value: Any, where: str, *, required: bool) -> dict[Any, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict) or (required and not value):
        raise ConfigError(f"{where}: expected a non-empty mapping, got {value!r}")
    return value


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ConfigError(f"{where}: expected a finite number {'above' if positive else 'of at least'} 0")
    return number


def _placement(value: Any, where: str, types: Mapping[str, InstancePrice]) -> Placement:
    if isinstance(value, str):
        value = {"instanceType": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an instance type name or a mapping with instanceType")
    unknown = sorted(set(map(str, value)) - _WORKLOAD_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(_WORKLOAD_KEYS))})")
    instance_type = value.get("instanceType")
    if not isinstance(instance_type, str) or instance_type not in types:
        known = ", ".join(sorted(types))
        raise ConfigError(f"{where}.instanceType: {instance_type!r} is not in instanceTypes ({known})")
    per_replica = _number(
        value.get("instancesPerReplica", 1.0), f"{where}.instancesPerReplica", positive=True
    )
    return Placement(instance_type, per_replica)


# --- the cost model ----------------------------------------------------------------


def cost_per_1k_tokens(hourly_cost: float, tokens_per_second: float) -> float | None:
    """hourly cost / (tokens/s x 3600) x 1000; None when no tokens flow (the cost is then idle)."""
    if not tokens_per_second > 0 or not math.isfinite(tokens_per_second):
        return None
    return hourly_cost / (tokens_per_second * 3600) * 1000


def shares(amount: float, weights: Mapping[str, float]) -> dict[str, float]:
    """``amount`` split in proportion to ``weights`` (negative weights count as 0)."""
    clean = {k: max(0.0, w) for k, w in weights.items()}
    total = sum(clean.values())
    if total <= 0:
        return {k: 0.0 for k in clean}
    return {k: amount * w / total for k, w in clean.items()}


@dataclass(frozen=True)
class ModelCost:
    tokens_per_second: float
    spend_per_hour: float
    cost_per_1k_tokens: float | None


@dataclass(frozen=True)
class WorkloadCost:
    replicas: int
    replica_price: ReplicaPrice
    hourly_cost: float
    tokens_per_second: float
    cost_per_1k_tokens: float | None
    models: dict[str, ModelCost]
    # tenant -> model -> $/hour
    tenants: dict[str, dict[str, float]]

    def tenant_totals(self) -> dict[str, float]:
        return {t: sum(per_model.values()) for t, per_model in self.tenants.items()}


def workload_cost(
    price: ReplicaPrice,
    replicas: int,
    model_tokens_per_second: Mapping[str, float],
    tenant_tokens: Mapping[tuple[str, str], float],
) -> WorkloadCost:
    """Hourly cost of ``replicas``, cost per 1k tokens, and spend per model and per tenant.

    ``model_tokens_per_second``: tokens/s (prompt + generated) per model;
    ``tenant_tokens``: tokens per (tenant, model) over any common period (only the
    proportions matter)."""
    hourly = replicas * price.hourly
    rates = {m: max(0.0, r) for m, r in model_tokens_per_second.items()}
    total = sum(rates.values())
    spend = shares(hourly, rates)
    models = {m: ModelCost(rates[m], spend[m], cost_per_1k_tokens(spend[m], rates[m])) for m in rates}
    tenants: dict[str, dict[str, float]] = {}
    for model, model_spend in spend.items():
        weights = {t: n for (t, m), n in tenant_tokens.items() if m == model}
        for tenant, amount in shares(model_spend, weights).items():
            tenants.setdefault(tenant, {})[model] = amount
    return WorkloadCost(replicas, price, hourly, total, cost_per_1k_tokens(hourly, total), models, tenants)
