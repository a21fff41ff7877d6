"""Every ScaledObject metadata key, its default, and every kind of bad value."""

from __future__ import annotations

import math

import pytest

from scaler.metadata import KEYS, parse
from token_scaler.errors import MetadataError

BASE = {"tokensPerSecondPerReplica": "1000", "scalerAddress": "scaler.keda:9090", "unknownKey": "x"}


def test_defaults() -> None:
    s = parse(BASE, "team-a", "vllm")
    assert s.workload == "team-a/vllm"
    assert s.tokens_per_second_per_replica == 1000
    assert (s.headroom, s.window_s, s.prompt_weight, s.generation_weight) == (1.3, 60, 1.0, 1.0)
    assert (s.panic_window_s, s.panic_threshold, s.activation_tokens_per_second, s.model) == (
        6,
        2.0,
        0.0,
        None,
    )
    assert s.target == pytest.approx(1000 / 1.3)


def test_every_key() -> None:
    s = parse(
        {
            **BASE,
            "workload": "other/llm",
            "headroom": "1.5",
            "windowSeconds": "120",
            "promptWeight": "0.2",
            "generationWeight": "1",
            "panicWindowSeconds": "10",
            "panicThreshold": "3",
            "panicHoldSeconds": "30",
            "activationTokensPerSecond": "5",
            "model": "llama-3-8b",
            "maxReplicas": "12",
        },
        "ns",
        "so",
    )
    assert (s.workload, s.headroom, s.window_s, s.prompt_weight, s.generation_weight) == (
        "other/llm",
        1.5,
        120,
        0.2,
        1.0,
    )
    assert (s.panic_window_s, s.panic_threshold, s.activation_tokens_per_second, s.model) == (
        10,
        3.0,
        5.0,
        "llama-3-8b",
    )
    assert s.panic_hold_s == 30
    assert s.size_window_s == 0
    assert (
        parse({"tokensPerSecondPerReplica": "1", "sizeWindowSeconds": "3600"}, "ns", "x").size_window_s
        == 3600
    )


def test_every_documented_key_is_parsed() -> None:
    assert set(KEYS) == {
        "workload",
        "tokensPerSecondPerReplica",
        "headroom",
        "windowSeconds",
        "promptWeight",
        "generationWeight",
        "panicWindowSeconds",
        "panicThreshold",
        "panicHoldSeconds",
        "arrivalMargin",
        "sizeWindowSeconds",
        "burstWindowSeconds",
        "burstQuantile",
        "burstLookbackSeconds",
        "activationTokensPerSecond",
        "model",
        "maxReplicas",
        "predictive",
        "leadSeconds",
        "maxForecastError",
        "kvCacheTarget",
        "inFlightPerReplica",
    }


def test_short_window_shrinks_the_default_panic_window() -> None:
    assert parse({**BASE, "windowSeconds": "10"}, "ns", "so").panic_window_s == 5


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("tokensPerSecondPerReplica", "0", "> 0"),
        ("tokensPerSecondPerReplica", "-5", "> 0"),
        ("tokensPerSecondPerReplica", "fast", "> 0"),
        ("tokensPerSecondPerReplica", "nan", "> 0"),
        ("tokensPerSecondPerReplica", "inf", "> 0"),
        ("headroom", "0.9", "from 1 to 10"),
        ("headroom", "11", "from 1 to 10"),
        ("windowSeconds", "9", "from 10 to 600"),
        ("windowSeconds", "601", "from 10 to 600"),
        ("windowSeconds", "60.5", "whole number"),
        ("sizeWindowSeconds", "90", "whole number of minutes"),
        ("sizeWindowSeconds", "86460", "whole number of minutes"),
        ("sizeWindowSeconds", "-60", "whole number of minutes"),
        ("sizeWindowSeconds", "1h", "whole number of minutes"),
        ("promptWeight", "-1", ">= 0"),
        ("generationWeight", "x", ">= 0"),
        ("panicWindowSeconds", "0", "from 1 to 30"),
        ("panicWindowSeconds", "31", "from 1 to 30"),
        ("panicThreshold", "1", "> 1"),
        ("panicHoldSeconds", "0", "from 1 to 600"),
        ("panicHoldSeconds", "601", "from 1 to 600"),
        ("activationTokensPerSecond", "-1", ">= 0"),
        ("model", " ", "model name"),
        ("workload", "no-slash", "<namespace>/<name>"),
        ("maxReplicas", "-1", "whole number >= 0"),
        ("predictive", "yes", "true or false"),
        ("leadSeconds", "30", "60 to 3600"),
        ("maxForecastError", "0", "a number > 0"),
        ("kvCacheTarget", "1.5", "in (0, 1]"),
        ("inFlightPerReplica", "0", "a number > 0"),
        ("inFlightPerReplica", "many", "a number > 0"),
        ("maxReplicas", "ten", "whole number >= 0"),
        ("workload", "NS/Upper", "<namespace>/<name>"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(key: str, value: str, expected: str) -> None:
    with pytest.raises(MetadataError) as info:
        parse({**BASE, key: value}, "ns", "so")
    assert info.value.key == key and info.value.value == value
    message = str(info.value)
    assert key in message and repr(value) in message and expected in message


def test_missing_capacity_is_required() -> None:
    with pytest.raises(MetadataError, match=r"tokensPerSecondPerReplica.*required"):
        parse({"scalerAddress": "x:1"}, "ns", "so")


def test_both_weights_zero() -> None:
    with pytest.raises(MetadataError, match="cannot both be 0"):
        parse({**BASE, "promptWeight": "0", "generationWeight": "0"}, "ns", "so")


def test_arrival_margin_is_a_fraction_or_off() -> None:
    base = {"workload": "ns/llm", "tokensPerSecondPerReplica": "100"}
    assert parse(base, "ns", "so").arrival_margin == 0
    assert parse({**base, "arrivalMargin": "0.25"}, "ns", "so").arrival_margin == 0.25
    assert parse({**base, "arrivalMargin": "OFF"}, "ns", "so").arrival_margin == math.inf
    for bad in ("-0.1", "11", "none", "nan"):
        with pytest.raises(MetadataError, match=f"arrivalMargin.*{bad}"):
            parse({**base, "arrivalMargin": bad}, "ns", "so")
