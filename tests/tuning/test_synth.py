"""The traffic synthesizer: seeded, follows its envelope within Poisson noise, sizes from the
Azure traces, a mix that shifts, a CSV that ``simulate`` reads, clear errors."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from token_scaler import cli
from token_scaler.errors import ConfigError
from tuning.synth import (
    DAY_S,
    HOUR_S,
    SynthConfig,
    Synthesized,
    diurnal,
    generate,
    service_sizes,
    synthesize,
    weekly,
)
from tuning.synthesize import summarize, write_csv
from tuning.trace import load_csv

WEEK = SynthConfig(days=7, mean_rps=0.5, seed=11)
CALM = replace(WEEK, bursts_per_day=0.0)


@functools.cache
def made(config: SynthConfig) -> Synthesized:
    """One generation per configuration for the whole module (the tests only read them)."""
    return generate(config)


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sum((observed - expected) ** 2 / expected))


def chi_square_bound(bins: int) -> float:
    """Five standard deviations above the mean of a chi-square with ``bins`` degrees of freedom."""
    return bins + 5 * math.sqrt(2 * bins)


def ks_distance(sample: np.ndarray, reference: np.ndarray) -> float:
    """Largest gap between the two empirical CDFs, over every value either holds."""
    values = np.union1d(sample, reference)
    a = np.searchsorted(np.sort(sample), values, side="right") / len(sample)
    b = np.searchsorted(np.sort(reference), values, side="right") / len(reference)
    return float(np.max(np.abs(a - b)))


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    one, two = made(WEEK), generate(WEEK)
    assert np.array_equal(one.trace.arrival_s, two.trace.arrival_s)
    assert np.array_equal(one.trace.prompt, two.trace.prompt)
    assert np.array_equal(one.trace.generated, two.trace.generated)
    other = made(replace(WEEK, seed=12))
    assert len(other.trace) != len(one.trace) or not np.array_equal(other.trace.prompt, one.trace.prompt)
    # the mix draws from its own stream: the same arrivals, other sizes
    shifting = made(replace(WEEK, mix="shifting"))
    assert np.array_equal(shifting.trace.arrival_s, one.trace.arrival_s)
    assert not np.array_equal(shifting.trace.prompt, one.trace.prompt)


def test_trace_counts_from_its_first_arrival_and_carries_the_attribution() -> None:
    trace = synthesize(replace(WEEK, days=1))
    assert trace.arrival_s[0] == 0.0
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert "CC-BY 4.0" in trace.attribution and "Splitwise" in trace.attribution
    assert "code, conversation" in trace.attribution
    only_code = synthesize(replace(WEEK, days=1, code_share=1.0))
    assert "(code)" in only_code.attribution


def test_hourly_counts_follow_the_envelope_within_poisson_noise() -> None:
    synth = made(WEEK)
    edges = np.arange(0, 7 * 24 + 1) * HOUR_S
    observed = np.histogram(synth.clock_s, bins=edges)[0]
    expected = synth.envelope.expected(edges)
    assert expected.sum() == pytest.approx(0.5 * 7 * DAY_S)
    assert abs(len(synth.trace) - expected.sum()) < 5 * math.sqrt(expected.sum())
    assert chi_square(observed, expected) < chi_square_bound(len(edges) - 1)
    # the check has the power to see a wrong envelope: a flat rate fails it by far
    flat = np.full(len(expected), expected.mean())
    assert chi_square(observed, flat) > 20 * chi_square_bound(len(edges) - 1)


def test_the_envelope_has_the_documented_shape() -> None:
    hours = np.arange(24.0)
    curve = diurnal(hours, 6.0, 14.0)
    assert int(np.argmax(curve)) == 14 and int(np.argmin(curve)) == 2
    assert curve.max() / curve.min() == pytest.approx(6.0)
    # business hours well above the night
    assert curve[9:19].min() > curve[22:].max() * 2 and curve[9:19].min() > curve[:6].max() * 2
    # Monday start: Saturday and Sunday at the weekend factor, full weekdays at 1
    noon = (np.arange(7) + 0.5) * DAY_S
    assert weekly(noon, replace(WEEK, weekend_factor=0.3)).tolist() == [1, 1, 1, 1, 1, 0.3, 0.3]
    saturday_first = weekly(noon, replace(WEEK, start_day="sat", weekend_factor=0.3))
    assert saturday_first.tolist() == [0.3, 0.3, 1, 1, 1, 1, 1]


def test_sampled_arrivals_show_the_peak_to_trough_and_weekend_factor() -> None:
    config = replace(CALM, mean_rps=1.0, peak_to_trough=5.0, weekend_factor=0.4)
    clock = generate(config).clock_s
    day, hour = (clock // DAY_S).astype(int), ((clock % DAY_S) // HOUR_S).astype(int)
    weekday = day < 5
    peak = np.count_nonzero(weekday & (hour == 14))
    trough = np.count_nonzero(weekday & (hour == 2))
    # the documented curve, 1 + 4 g(h)^2, averaged over each hour-long bin: about 4.95
    minutes = np.linspace(0, 1, 61)

    def curve(h: np.ndarray) -> float:
        return float(np.mean(1 + 4 * ((1 + np.cos(2 * np.pi * (h - 14) / 24)) / 2) ** 2))

    expected = curve(14 + minutes) / curve(2 + minutes)
    assert 4.9 < expected < 5.0
    assert peak / trough == pytest.approx(expected, rel=4 * math.sqrt(1 / peak + 1 / trough))
    daytime = (hour >= 3) & (hour < 21)
    saturday = np.count_nonzero(daytime & (day == 5))
    wednesday = np.count_nonzero(daytime & (day == 2))
    assert saturday / wednesday == pytest.approx(0.4, rel=4 * math.sqrt(1 / saturday + 1 / wednesday))


def _burst_factors(config: SynthConfig, seconds: float) -> tuple[Synthesized, np.ndarray, np.ndarray]:
    """The trace of ``config`` (bursts of ``seconds`` each), how many bursts cover each step of
    its envelope, and each step's rate over that of the same trace without bursts, relative to
    the steps no burst covers (both are scaled to the same mean, so those differ by one
    constant factor, checked here)."""
    synth = generate(config)
    calm = generate(replace(config, bursts_per_day=0.0))
    starts = synth.envelope.bursts.start_s
    mid = synth.envelope.edges[:-1] + 0.5
    covering = np.sum((mid[:, None] >= starts) & (mid[:, None] < starts + seconds), axis=1)
    ratio = synth.envelope.rate / calm.envelope.rate
    base = ratio[covering == 0]
    assert np.allclose(base, base[0])
    return synth, covering, ratio / base[0]


def test_bursts_multiply_the_rate_where_they_fall() -> None:
    config = replace(WEEK, days=1, bursts_per_day=6.0, burst_multiplier=(3.0, 3.0), burst_seconds=(600, 600))
    synth, covering, factor = _burst_factors(config, 600)
    bursts = synth.envelope.bursts
    assert len(bursts.start_s) > 0
    assert np.allclose(factor, 3.0**covering)
    windows = np.sort(np.concatenate([bursts.start_s, bursts.start_s + 600]))
    observed = np.histogram(synth.clock_s, bins=windows)[0][::2].sum()
    expected = synth.envelope.expected(windows)[::2].sum()
    assert abs(observed - expected) < 5 * math.sqrt(expected)


def test_overlapping_bursts_add_their_excesses_when_asked() -> None:
    config = replace(
        WEEK,
        days=1,
        bursts_per_day=40.0,
        burst_multiplier=(5.0, 5.0),
        burst_seconds=(1800, 1800),
        burst_overlap="add",
    )
    _, covering, factor = _burst_factors(config, 1800)
    assert covering.max() >= 3  # the case the two rules differ on is there
    assert np.allclose(factor, 1.0 + 4.0 * covering)
    _, _, multiplied = _burst_factors(replace(config, burst_overlap="multiply"), 1800)
    assert np.allclose(multiplied, 5.0**covering)


def test_sizes_come_from_the_trace_distribution() -> None:
    code, conversation = service_sizes("code"), service_sizes("conversation")
    trace = synthesize(replace(WEEK, days=2, code_share=1.0))
    n = len(trace)
    # KS at the 0.1 % level; the sample is drawn from the trace's own (discrete) distribution,
    # for which the bound is conservative
    bound = 1.95 * math.sqrt((n + len(code.prompt)) / (n * len(code.prompt)))
    assert ks_distance(trace.prompt, code.prompt) < bound
    assert ks_distance(trace.generated, code.generated) < bound
    # the check can fail: code sizes are far from the conversation trace's
    assert ks_distance(trace.generated, conversation.generated) > 10 * bound
    # requests keep their (prompt, generated) pairs
    pairs = set(zip(code.prompt.tolist(), code.generated.tolist(), strict=True))
    assert set(zip(trace.prompt.tolist(), trace.generated.tolist(), strict=True)) <= pairs
    chat = synthesize(replace(WEEK, days=1, code_share=0.0))
    chat_bound = 1.95 * math.sqrt(
        (len(chat) + len(conversation.prompt)) / (len(chat) * len(conversation.prompt))
    )
    assert ks_distance(chat.generated, conversation.generated) < chat_bound


def _hourly_code_share(config: SynthConfig) -> np.ndarray:
    synth = made(config)
    hour = ((synth.clock_s % DAY_S) // HOUR_S).astype(int)
    code = np.bincount(hour, weights=(synth.service == 0).astype(float), minlength=24)
    return code / np.bincount(hour, minlength=24)


def test_the_shifting_mix_shifts_and_the_steady_one_does_not() -> None:
    shifting = _hourly_code_share(replace(WEEK, mix="shifting"))
    # code's share follows code_share + 0.35 cos(2 pi (h - 12) / 24) at the middle of each hour
    model = 0.5 + 0.35 * np.cos(2 * np.pi * (np.arange(24) + 0.5 - 12) / 24)
    assert np.abs(shifting - model).max() < 0.03
    assert shifting[9:15].min() > 0.75 and shifting[21:].max() < 0.3 and shifting[:3].max() < 0.3
    # code completion peaks in business hours, conversation in the evening
    synth = made(replace(WEEK, mix="shifting"))
    hour = ((synth.clock_s % DAY_S) // HOUR_S).astype(int)
    code_rate = np.bincount(hour[synth.service == 0], minlength=24)
    conversation_rate = np.bincount(hour[synth.service == 1], minlength=24)
    assert 12 <= int(np.argmax(code_rate)) <= 14 and 17 <= int(np.argmax(conversation_rate)) <= 19
    steady = _hourly_code_share(WEEK)
    assert np.abs(steady - 0.5).max() < 0.03

    weights = {"prompt_weight": 1.0, "generation_weight": 1.0}
    swing_shifting = summarize(made(replace(WEEK, mix="shifting")), **weights).swing
    swing_steady = summarize(made(WEEK), **weights).swing
    # code weighs 2,076 tokens a request, conversation 1,366: 85 % vs 15 % code gives x1.34
    assert swing_shifting > 1.25 and swing_steady < 1.1


def test_csv_round_trips_through_load_csv(tmp_path: Path) -> None:
    synth = generate(replace(WEEK, days=1))
    path = tmp_path / "day.csv"
    write_csv(synth, path)
    back = load_csv(path)
    assert len(back) == len(synth.trace)
    assert np.allclose(back.arrival_s, synth.trace.arrival_s, atol=5e-4, rtol=0)
    assert np.array_equal(back.prompt, synth.trace.prompt)
    assert np.array_equal(back.generated, synth.trace.generated)


def test_the_command_writes_the_csv_the_note_and_a_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "week.csv"
    code = cli.main(["synthesize", "--days", "2", "--mean-rps", "0.2", "--mix", "shifting", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = len(load_csv(out))
    assert f"requests  {rows:,} over 48 h" in printed
    assert "swing x" in printed and "CC-BY 4.0" in printed
    note = (tmp_path / "week.md").read_text()
    assert "Splitwise" in note and "mix: shifting" in note and "--mean-rps 0.2" in note
    # a replay of the CSV carries the note's attribution (simulate prints it and plots it)
    assert load_csv(out).attribution.startswith("request sizes from the Azure LLM inference trace 2023")
    (tmp_path / "week.md").unlink()
    assert load_csv(out).attribution == ""


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"days": 0}, "days=0"),
        ({"days": 61}, "days=61"),
        ({"mean_rps": -1}, "mean_rps=-1"),
        ({"mean_rps": 1000.0}, "more than 50,000,000 requests"),
        ({"peak_to_trough": 0.5}, "peak_to_trough=0.5"),
        ({"peak_hour": 24}, "peak_hour=24"),
        ({"start_day": "monday"}, "start_day='monday': expected one of mon"),
        ({"burst_multiplier": (3.0, 2.0)}, "burst_multiplier=(3.0, 2.0)"),
        ({"burst_seconds": (0.0, 10.0)}, "burst_seconds=(0.0, 10.0)"),
        ({"burst_overlap": "stack"}, "burst_overlap='stack'"),
        ({"mix": "diurnal"}, "mix='diurnal': expected one of steady, shifting"),
        ({"code_share": 1.5}, "code_share=1.5"),
        ({"seed": -1}, "seed=-1: expected a whole number"),
    ],
)
def test_bad_settings_name_the_setting(settings: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        SynthConfig(**settings)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peak-to-trough", "0.5"], "peak_to_trough=0.5: expected a finite ratio of 1 or more"),
        (["--burst-multiplier", "3"], "argument --burst-multiplier: '3': expected LOW,HIGH"),
        (["--burst-seconds", "60,30"], "'60,30': LOW is above HIGH"),
        (["--days", "x"], "argument --days: 'x': expected a number"),
        (["--mix", "hourly"], "argument --mix: invalid choice: 'hourly'"),
    ],
)
def test_bad_flags_give_clear_errors(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    full = ["synthesize", "-o", str(tmp_path / "t.csv"), *argv]
    try:
        code = cli.main(full)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


def test_an_empty_trace_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.csv"
    assert cli.main(["synthesize", "--days", "0.0001", "--mean-rps", "0.001", "-o", str(out)]) == 2
    assert "no requests drawn" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_outputs_are_config_errors(tmp_path: Path, capsys) -> None:
    assert cli.main(["synthesize", "--days", "0.01", "-o", str(tmp_path / "t.md")]) == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert cli.main(["synthesize", "--days", "0.01", "-o", str(tmp_path / "missing" / "t.csv")]) == 2
    assert "cannot write" in capsys.readouterr().err
