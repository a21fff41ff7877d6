"""The price table and the cost model against hand-computed figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaler.config import ScalerConfig
from token_scaler.errors import ConfigError
from token_scaler.pricing import (
    PriceTable,
    ReplicaPrice,
    cost_per_1k_tokens,
    load,
    parse,
    shares,
    workload_cost,
)

TABLE = """
currency: USD
instanceTypes:
  g5.xlarge: {instance: 2.50, storage: 0.30, network: 0.20}   # 3.00 $/h
  p4d.24xlarge: {instance: 32.00, storage: 0.50, network: 0.26}  # 32.76 $/h
workloads:
  llm/vllm: g5.xlarge
  llm/big: {instanceType: p4d.24xlarge, instancesPerReplica: 0.125}
models:
  gemma-3-270m: g5.xlarge
  llama-70b: p4d.24xlarge
"""


@pytest.fixture
def table(tmp_path: Path) -> PriceTable:
    path = tmp_path / "prices.yaml"
    path.write_text(TABLE)
    return load(path)


def test_replica_prices(table: PriceTable) -> None:
    vllm = table.replica_price("llm/vllm")
    assert isinstance(vllm, ReplicaPrice)
    assert vllm.hourly == pytest.approx(3.00) and vllm.source == "workloads['llm/vllm']"
    big = table.replica_price("llm/big")
    assert isinstance(big, ReplicaPrice)
    assert big.hourly == pytest.approx(32.76 / 8)  # 4.095 $/h: one GPU of eight
    by_model = table.replica_price("other/ns", ["gemma-3-270m"])
    assert isinstance(by_model, ReplicaPrice) and by_model.hourly == pytest.approx(3.00)
    assert by_model.source == "models['gemma-3-270m']"
    assert "not in the price table" in str(table.replica_price("other/ns", ["unknown"]))
    assert "different instance types" in str(table.replica_price("other/ns", ["gemma-3-270m", "llama-70b"]))


def test_cost_per_1k_tokens_by_hand() -> None:
    # 4 replicas x 3.00 $/h = 12 $/h; 2000 tokens/s = 7.2M tokens/h; 12 / 7.2M x 1000
    assert cost_per_1k_tokens(12.0, 2000.0) == pytest.approx(0.0016666667)
    # 1.03 $/h at 1500 tokens/s: 1.03 / 5.4M x 1000
    assert cost_per_1k_tokens(1.03, 1500.0) == pytest.approx(0.00019074074)
    assert cost_per_1k_tokens(12.0, 0.0) is None  # idle: no tokens to divide by
    assert cost_per_1k_tokens(12.0, -5.0) is None


def test_shares() -> None:
    assert shares(12.0, {"a": 3, "b": 1}) == {"a": 9.0, "b": 3.0}
    assert shares(12.0, {"a": 5, "b": -1}) == {"a": 12.0, "b": 0.0}  # corrections never go negative
    assert shares(12.0, {"a": 0}) == {"a": 0.0}


def test_workload_cost_by_hand(table: PriceTable) -> None:
    price = table.replica_price("llm/vllm")
    assert isinstance(price, ReplicaPrice)
    cost = workload_cost(
        price,
        4,
        {"model-a": 1500.0, "model-b": 500.0},
        {("acme", "model-a"): 1200, ("beta", "model-a"): 300, ("acme", "model-b"): 500},
    )
    assert cost.hourly_cost == pytest.approx(12.0)
    assert cost.tokens_per_second == pytest.approx(2000.0)
    assert cost.cost_per_1k_tokens == pytest.approx(12 / 7_200_000 * 1000)
    a, b = cost.models["model-a"], cost.models["model-b"]
    assert a.spend_per_hour == pytest.approx(9.0) and b.spend_per_hour == pytest.approx(3.0)
    # pods shared by both models: the same cost per 1k tokens for each
    assert a.cost_per_1k_tokens == pytest.approx(0.0016666667)
    assert b.cost_per_1k_tokens == pytest.approx(0.0016666667)
    assert cost.tenants == {
        "acme": {"model-a": pytest.approx(7.2), "model-b": pytest.approx(3.0)},
        "beta": {"model-a": pytest.approx(1.8)},
    }
    assert cost.tenant_totals() == {"acme": pytest.approx(10.2), "beta": pytest.approx(1.8)}
    assert sum(cost.tenant_totals().values()) == pytest.approx(cost.hourly_cost)


def test_idle_workload_costs_but_has_no_cost_per_token(table: PriceTable) -> None:
    price = table.replica_price("llm/big")
    assert isinstance(price, ReplicaPrice)
    cost = workload_cost(price, 2, {}, {})
    assert cost.hourly_cost == pytest.approx(8.19)  # 2 x 32.76 / 8
    assert cost.cost_per_1k_tokens is None and cost.models == {} and cost.tenants == {}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[1, 2]", "expected a mapping"),
        ("instanceTypes: {a: {instance: 1}}\nworkloads: {llm/x: a}\nprice: 3", "price: unknown key"),
        ("workloads: {llm/x: a}", "instanceTypes: expected a non-empty mapping"),
        (
            "instanceTypes: {a: {instance: -1}}\nworkloads: {llm/x: a}",
            "instanceTypes['a'].instance: expected",
        ),
        (
            "instanceTypes: {a: {instance: abc}}\nworkloads: {llm/x: a}",
            "instanceTypes['a'].instance: expected a number",
        ),
        ("instanceTypes: {a: {storage: 1}}\nworkloads: {llm/x: a}", "instanceTypes['a'].instance: required"),
        (
            "instanceTypes: {a: {instance: 1, gpu: 2}}\nworkloads: {llm/x: a}",
            "instanceTypes['a'].gpu: unknown",
        ),
        (
            "instanceTypes: {a: {instance: 1}}\nworkloads: {llm/x: b}",
            "workloads['llm/x'].instanceType: 'b' is not",
        ),
        (
            "instanceTypes: {a: {instance: 1}}\nworkloads: {Bad_Name: a}",
            "workloads['Bad_Name']: expected <namespace>",
        ),
        (
            "instanceTypes: {a: {instance: 1}}\n"
            "workloads: {llm/x: {instanceType: a, instancesPerReplica: 0}}",
            "workloads['llm/x'].instancesPerReplica: expected a finite number above 0",
        ),
        (
            "instanceTypes: {a: {instance: 1}}\nworkloads: {llm/x: {type: a}}",
            "workloads['llm/x'].type: unknown",
        ),
        ("instanceTypes: {a: {instance: 1}}", "workloads: required"),
        ("instanceTypes: {a: {instance: 1}}\nmodels: {m: a}\ncurrency: 3", "currency: expected"),
        (
            "instanceTypes: {a: {instance: true}}\nmodels: {m: a}",
            "instanceTypes['a'].instance: expected a number",
        ),
    ],
)
def test_bad_tables_name_the_key(text: str, error: str) -> None:
    import yaml

    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse(yaml.safe_load(text))


def test_the_scaler_validates_its_price_table_at_start_up(tmp_path: Path) -> None:
    good = tmp_path / "prices.yaml"
    good.write_text(TABLE)
    config = ScalerConfig.from_args(["--prices", str(good)], {})
    assert config.prices is not None and set(config.prices.workloads) == {"llm/vllm", "llm/big"}
    from_env = ScalerConfig.from_args([], {"TOKEN_SCALER_PRICES": str(good)})
    assert from_env.prices == config.prices
    assert ScalerConfig.from_args([], {}).prices is None

    bad = tmp_path / "bad.yaml"
    bad.write_text("instanceTypes: {a: {instance: 1}}\nworkloads: {llm/x: nope}\n")
    with pytest.raises(ConfigError) as info:
        ScalerConfig.from_args([], {"TOKEN_SCALER_PRICES": str(bad)})
    message = str(info.value)
    assert "TOKEN_SCALER_PRICES" in message and "workloads['llm/x'].instanceType" in message
    assert str(bad) in message

    with pytest.raises(ConfigError, match=r"--prices.*cannot read"):
        ScalerConfig.from_args(["--prices", str(tmp_path / "missing.yaml")], {})
    broken = tmp_path / "broken.yaml"
    broken.write_text("instanceTypes: {a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ScalerConfig.from_args(["--prices", str(broken)], {})
