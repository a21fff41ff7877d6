"""``token-scaler synthesize``: write a trace with days and weeks in it (``tuning/synth.py``) as
a CSV that ``token-scaler simulate --trace`` replays, a note beside it, and a summary.

Example::

    token-scaler synthesize --days 7 --mean-rps 1.65 --mix shifting --seed 1 -o week.csv
    token-scaler simulate --trace week.csv --cold-start 120
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from token_scaler import config as parse
from token_scaler.errors import ConfigError
from tuning import args as a
from tuning.replica import ReplicaProfile
from tuning.synth import (
    DAY_S,
    HOUR_S,
    MIXES,
    OVERLAPS,
    SERVICES,
    WEEKDAYS,
    SynthConfig,
    Synthesized,
    generate,
)

_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


@dataclass(frozen=True)
class Summary:
    """What a synthesized trace holds. Hourly figures pool each hour of the day over all days;
    weighted tokens are ``prompt_weight * prompt + generation_weight * generated``."""

    requests: int
    duration_s: float
    mean_rps: float
    peak_minute_rps: float
    peak_hour_rps: float
    quietest_hour_rps: float
    code_share: float
    bursts: int
    prompt_weight: float
    generation_weight: float
    hourly_rps: list[float]
    hourly_code_share: list[float]
    hourly_weighted_per_request: list[float]

    @property
    def swing(self) -> float:
        """Highest over lowest hourly weighted tokens per request."""
        values = [v for v in self.hourly_weighted_per_request if v > 0]
        return max(values) / min(values) if values else 1.0


def _per_hour(values: np.ndarray, hour: np.ndarray) -> np.ndarray:
    counts = np.bincount(hour, minlength=24).astype(np.float64)
    sums = np.bincount(hour, weights=values, minlength=24)
    return np.divide(sums, counts, out=np.zeros(24), where=counts > 0)


def _rates(times: np.ndarray, span: float, width: float, modulo: float | None = None) -> np.ndarray:
    """Arrivals per second in bins of ``width`` seconds (folded over ``modulo``), each divided by
    the time the span spends in it, so a partial bin is not read as a quiet one."""
    edges = np.arange(0.0, span + width, width)
    covered = np.diff(np.minimum(edges, span))
    slot = np.arange(len(covered)) if modulo is None else (edges[:-1] % modulo // width).astype(np.int64)
    size = len(covered) if modulo is None else int(modulo // width)
    exposure = np.bincount(slot, weights=covered, minlength=size)
    index = (times // width).astype(np.int64)
    counts = np.bincount(index if modulo is None else index % size, minlength=size)[:size]
    return np.divide(counts, exposure, out=np.zeros(size), where=exposure > 0)


def summarize(
    synth: Synthesized, prompt_weight: float = 1.0, generation_weight: float | None = None
) -> Summary:
    """``generation_weight`` defaults to what the simulator's default replica model suggests."""
    if generation_weight is None:
        generation_weight = ReplicaProfile().suggested_weights()[1]
    trace, span, clock = synth.trace, synth.config.span_s, synth.clock_s
    hours = _rates(clock, span, HOUR_S)
    hour_of_day = ((clock % DAY_S) // HOUR_S).astype(np.int64)
    weighted = (prompt_weight * trace.prompt + generation_weight * trace.generated).astype(np.float64)
    is_code = (synth.service == 0).astype(np.float64)
    return Summary(
        requests=len(trace),
        duration_s=span,
        mean_rps=len(trace) / span,
        peak_minute_rps=float(_rates(clock, span, 60.0).max()),
        peak_hour_rps=float(hours.max()),
        quietest_hour_rps=float(hours.min()),
        code_share=float(is_code.mean()) if len(trace) else 0.0,
        bursts=len(synth.envelope.bursts.start_s),
        prompt_weight=prompt_weight,
        generation_weight=generation_weight,
        hourly_rps=[float(v) for v in _rates(clock, span, HOUR_S, DAY_S)],
        hourly_code_share=[float(v) for v in _per_hour(is_code, hour_of_day)],
        hourly_weighted_per_request=[float(v) for v in _per_hour(weighted, hour_of_day)],
    )


def report(summary: Summary, config: SynthConfig) -> list[str]:
    hourly = summary.hourly_weighted_per_request
    present = [h for h in range(24) if summary.hourly_rps[h] > 0]
    low = min(present, key=lambda h: hourly[h]) if present else 0
    high = max(present, key=lambda h: hourly[h]) if present else 0
    return [
        f"requests  {summary.requests:,} over {summary.duration_s / HOUR_S:g} h "
        f"({config.days:g} day{'' if config.days == 1 else 's'} from {config.start_day} 00:00), "
        f"{config.mix} mix, seed {config.seed}",
        f"rate      mean {summary.mean_rps:.3g} req/s, busiest minute {summary.peak_minute_rps:.3g}, "
        f"busiest hour {summary.peak_hour_rps:.3g}, quietest hour {summary.quietest_hour_rps:.3g}; "
        f"{summary.bursts} bursts",
        f"services  code {summary.code_share:.1%}, conversation {1 - summary.code_share:.1%}; "
        f"code share by hour of day {min(summary.hourly_code_share[h] for h in present):.0%}"
        f"-{max(summary.hourly_code_share[h] for h in present):.0%}"
        if present
        else "services  none",
        f"weighted tokens per request (prompt x{summary.prompt_weight:g} + generated "
        f"x{summary.generation_weight:g}) by hour of day: lowest {hourly[low]:,.0f} at {low:02d}:00, "
        f"highest {hourly[high]:,.0f} at {high:02d}:00, swing x{summary.swing:.2f}",
    ]


def write_csv(synth: Synthesized, path: Path) -> None:
    """The trace as ``simulate`` reads it: seconds (to the millisecond) from the first arrival."""
    t = synth.trace
    rows = zip(t.arrival_s.tolist(), t.prompt.tolist(), t.generated.tolist(), strict=True)
    with open(path, "w", newline="") as handle:
        handle.write(_HEADER + "\n")
        handle.writelines(f"{s:.3f},{p},{g}\n" for s, p, g in rows)


def note_text(synth: Synthesized, lines: list[str], argv: Sequence[str], csv_name: str) -> str:
    settings = "\n".join(f"- {key}: {value}" for key, value in asdict(synth.config).items())
    return (
        f"# {csv_name}\n\nSynthesized by `token-scaler synthesize {shlex.join(argv)}` "
        "(arrival model and sources: tuning/synth.py).\n\n"
        f"Attribution: {synth.trace.attribution}. Keep it with the file and any result derived from it.\n\n"
        f"```\n" + "\n".join(lines) + "\n```\n\n"
        f"Settings:\n{settings}\n\nReplay: `token-scaler simulate --trace {csv_name}`\n"
    )


def _pair(raw: str) -> tuple[float, float]:
    parts = raw.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected LOW,HIGH")
    try:
        low, high = (parse.positive_float(part) for part in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"{raw!r}: LOW is above HIGH")
    return low, high


def _arrival_arguments(p: argparse.ArgumentParser, d: SynthConfig) -> None:
    """The options of the arrival process (rate envelope, bursts, seed); defaults from ``d``."""
    g = p.add_argument_group("arrivals")
    g.add_argument("--days", type=a.positive_float, default=d.days, help="length in days (e.g. 1 or 7)")
    g.add_argument("--mean-rps", type=a.positive_float, default=d.mean_rps, help="mean requests/s")
    g.add_argument("--peak-to-trough", type=a.positive_float, default=d.peak_to_trough, help="daily ratio")
    g.add_argument(
        "--peak-hour", type=a.non_negative_float, default=d.peak_hour, help="local hour of the peak"
    )
    g.add_argument(
        "--weekend-factor", type=a.positive_float, default=d.weekend_factor, help="weekend/weekday"
    )
    g.add_argument("--start-day", choices=WEEKDAYS, default=d.start_day, help="day of the week at time 0")
    g.add_argument(
        "--bursts-per-day", type=a.non_negative_float, default=d.bursts_per_day, help="mean number"
    )
    g.add_argument("--burst-multiplier", type=_pair, default=d.burst_multiplier, help="LOW,HIGH rate factor")
    g.add_argument("--burst-seconds", type=_pair, default=d.burst_seconds, help="LOW,HIGH burst length")
    g.add_argument(
        "--burst-overlap",
        choices=OVERLAPS,
        default=d.burst_overlap,
        help="where bursts overlap, their factors multiply or their excesses add",
    )
    g.add_argument("--seed", type=a.arg(a.non_negative_int), default=d.seed, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    d = SynthConfig()
    p = argparse.ArgumentParser(
        prog="token-scaler synthesize",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a trace CSV (TIMESTAMP in seconds, ContextTokens, GeneratedTokens) of days of "
        "LLM traffic: Poisson arrivals following a daily + weekly envelope with random bursts, request "
        "sizes drawn from the Azure LLM inference trace 2023 (code, conversation), and a note beside "
        "it (same name, .md) with the settings and the attribution. The envelope, where its shape "
        "comes from and what is assumed: tuning/synth.py.",
        epilog='Request sizes: Azure LLM inference trace 2023, CC-BY 4.0: Patel et al., "Splitwise: '
        'Efficient generative LLM inference using phase splitting", ISCA 2024. Keep this attribution '
        "with the CSV and any result derived from it.",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        default=argparse.SUPPRESS,
        help="CSV to write (the note: same name, .md)",
    )
    _arrival_arguments(p, d)
    g = p.add_argument_group("request sizes")
    g.add_argument(
        "--mix", choices=MIXES, default=d.mix, help=f"mix of {' and '.join(SERVICES)} over the day"
    )
    g.add_argument(
        "--code-share",
        type=a.arg(a.fraction),
        default=d.code_share,
        help="share of code requests (steady), or the centre of its daily swing (shifting)",
    )
    g.add_argument("--mix-swing", type=a.arg(a.fraction), default=d.mix_swing, help="shifting: share swing")
    g = p.add_argument_group("summary")
    g.add_argument(
        "--prompt-weight",
        type=a.non_negative_float,
        default=1.0,
        help="promptWeight (weighted tokens = promptWeight x prompt + generationWeight x generated tokens)",
    )
    g.add_argument(
        "--generation-weight",
        type=a.non_negative_float,
        default=argparse.SUPPRESS,
        help="generationWeight: what a generated token costs in prompt tokens (default: that of the "
        "simulator's default replica model)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(args)
    config = SynthConfig(
        days=ns.days,
        mean_rps=ns.mean_rps,
        peak_to_trough=ns.peak_to_trough,
        peak_hour=ns.peak_hour,
        weekend_factor=ns.weekend_factor,
        start_day=ns.start_day,
        bursts_per_day=ns.bursts_per_day,
        burst_multiplier=ns.burst_multiplier,
        burst_seconds=ns.burst_seconds,
        burst_overlap=ns.burst_overlap,
        mix=ns.mix,
        code_share=ns.code_share,
        mix_swing=ns.mix_swing,
        seed=ns.seed,
    )
    synth = generate(config)
    if not len(synth.trace):
        expected = config.mean_rps * config.span_s
        raise ConfigError(
            f"no requests drawn ({expected:.2g} expected from --mean-rps {config.mean_rps:g} over "
            f"--days {config.days:g}); raise either"
        )
    lines = report(summarize(synth, ns.prompt_weight, getattr(ns, "generation_weight", None)), config)
    output: Path = ns.output
    note = output.with_suffix(".md")
    if note == output:
        raise ConfigError(f"--output {output}: the note beside the CSV would overwrite it; name it .csv")
    try:
        write_csv(synth, output)
        note.write_text(note_text(synth, lines, args, output.name))
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot write: {exc.strerror or exc}") from None
    print("\n".join(lines))
    print(f"wrote     {output} and {note}")
    print(f"sizes     {synth.trace.attribution}")
    return 0
