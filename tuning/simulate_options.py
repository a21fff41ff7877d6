"""The options of ``token-scaler simulate``: its parser, and the readers of the values its
sweep options take."""

from __future__ import annotations

import argparse
from pathlib import Path

from scaler.metadata import SPEC
from token_scaler.errors import MetadataError
from tuning import args as a
from tuning.engine import ROUTINGS
from tuning.registry import POLICIES, RUNNABLE
from tuning.sweep import PANIC_OFF, parse_burst, parse_panic
from tuning.trace import sample_path
from tuning.workers import usable_cpus


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="token-scaler simulate",
        description="Replay a request trace through a simulated Deployment under KEDA + HPA and "
        "compare scaling policies: GPU-hours, cost, SLO attainment, latency, queues, replicas.",
    )
    _trace_options(p)
    _replica_options(p)
    _hpa_options(p)
    _policy_options(p)
    _result_options(p)
    _sweep_options(p)
    return p


def _trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace")
    g.add_argument(
        "--trace",
        type=Path,
        help=f"CSV TIMESTAMP,ContextTokens,GeneratedTokens (default: {sample_path().name}, shipped)",
    )
    g.add_argument("--speedup", type=a.positive_float, default=1.0, help="divide time by this (default 1)")
    g.add_argument(
        "--scale", type=a.positive_float, default=1.0, help="multiply the load by this (default 1)"
    )
    g.add_argument(
        "--seed", type=a.arg(a.non_negative_int), default=0, help="seed of --scale's copies (default 0)"
    )
    g.add_argument(
        "--warm-up",
        type=a.non_negative_float,
        default=0.0,
        help="play the trace's last SECONDS first and count GPU-hours and SLOs from then on, so "
        "every policy starts where running all along left it (default 0: no warm-up)",
    )


def _replica_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas")
    g.add_argument("--replica-profile", type=Path, help="JSON written by `token-scaler profile`")
    g.add_argument(
        "--cold-start", type=a.non_negative_float, help="seconds from pod creation to ready (default 120)"
    )
    g.add_argument(
        "--price-per-hour", type=a.non_negative_float, help="price of one replica-hour (default 2.5)"
    )
    g.add_argument(
        "--max-concurrency", type=a.positive_int, help="sequences one replica runs at once (default 32)"
    )
    g.add_argument(
        "--max-queue", type=a.arg(a.non_negative_int), help="requests one replica queues (default 512)"
    )
    g.add_argument(
        "--kv-cache-tokens",
        type=a.positive_int,
        help="KV-cache capacity of one replica in tokens: a request is admitted when its prompt and "
        "generation fit beside those running (default: no limit but --max-concurrency)",
    )
    g.add_argument(
        "--timeout",
        type=a.positive_float,
        default=60.0,
        help="a client gives up queueing after (s, default 60)",
    )
    g.add_argument(
        "--grace",
        type=a.non_negative_float,
        default=600.0,
        help="terminationGracePeriodSeconds (default 600)",
    )


def _hpa_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KEDA and HPA")
    g.add_argument(
        "--min-replicas", type=a.arg(a.non_negative_int), default=1, help="minReplicaCount (default 1)"
    )
    g.add_argument("--max-replicas", type=a.positive_int, default=40, help="maxReplicaCount (default 40)")
    g.add_argument(
        "--initial-replicas",
        type=a.arg(a.non_negative_int),
        help="ready at the start (default: the replicas that serve the first cold start + 60 s "
        "of the trace at capacity, at least min)",
    )
    g.add_argument(
        "--polling-interval", type=a.positive_float, default=30.0, help="KEDA pollingInterval (default 30)"
    )
    g.add_argument(
        "--cooldown", type=a.non_negative_float, default=300.0, help="KEDA cooldownPeriod (default 300)"
    )
    g.add_argument("--sync-period", type=a.positive_float, default=15.0, help="HPA sync period (default 15)")
    g.add_argument("--tolerance", type=a.non_negative_float, default=0.1, help="HPA tolerance (default 0.1)")
    g.add_argument(
        "--scale-down-window",
        type=a.non_negative_float,
        default=300.0,
        help="scaleDown stabilizationWindowSeconds (default 300)",
    )
    g.add_argument(
        "--scale-up-window",
        type=a.non_negative_float,
        default=0.0,
        help="scaleUp stabilizationWindowSeconds (default 0)",
    )
    g.add_argument(
        "--use-cached-metrics",
        action="store_true",
        help="the HPA reads the value KEDA polled, not a fresh one",
    )
    g.add_argument(
        "--routing",
        choices=ROUTINGS,
        default="least-requests",
        help="how a request picks a ready pod (default least-requests)",
    )


def _policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policies")
    g.add_argument(
        "--policies",
        type=a.listed(_policy_name),
        default=[*RUNNABLE, "foresight"],
        help=f"comma-separated, from {', '.join(POLICIES)} (default: the first four and foresight)",
    )
    g.add_argument(
        "--metadata",
        type=a.key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="token policy: ScaledObject trigger metadata (repeat); promptWeight and generationWeight "
        "default to 1 and what a generated token costs in prompt tokens, from the replica model "
        "or --replica-profile (weighted tokens = promptWeight x prompt + generationWeight x generated "
        "tokens)",
    )
    g.add_argument(
        "--fixed-replicas",
        type=a.positive_int,
        help="also run a Deployment of this many replicas and no autoscaling (policy 'fixed')",
    )
    g.add_argument(
        "--rps-window", type=a.positive_int, default=60, help="request-rate window, s (default 60)"
    )
    g.add_argument(
        "--scrape-interval",
        type=a.positive_int,
        default=15,
        help="Prometheus scrape interval, s (default 15)",
    )
    g.add_argument(
        "--rate-window", type=a.positive_int, default=60, help="Prometheus rate() window, s (default 60)"
    )
    g.add_argument(
        "--lookahead-margin",
        type=a.non_negative_float,
        default=30.0,
        help="foresight: seconds it sees beyond the cold start, the time to act (default 30)",
    )


def _result_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results")
    g.add_argument(
        "--ttft-slo", type=a.positive_float, default=2.0, help="time to first token target, s (default 2)"
    )
    g.add_argument(
        "--tpot-slo",
        type=a.positive_float,
        default=0.1,
        help="time per output token target (after the first), s (default 0.1)",
    )
    g.add_argument(
        "--e2e-slo", type=a.positive_float, help="also bound each request end to end, s (default: no bound)"
    )
    g.add_argument("--json", type=Path, help="write every figure (and the sweep) here")
    g.add_argument("--plot", type=Path, help="write a PNG here (and <name>-sweep.png with --sweep)")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument(
        "--jobs",
        type=a.positive_int,
        default=usable_cpus(),
        help="worker processes the policies' runs (and the sweep's setting families) run in; the "
        "results are the same whatever the count, each worker holds a copy of the trace "
        "(default: the CPUs usable)",
    )


def _sweep_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep: every policy searched alike")
    g.add_argument(
        "--sweep",
        action="store_true",
        help="search every policy's settings and fixed replica counts; compare the cheapest "
        "reaching each attainment level, with the foresight bound",
    )
    g.add_argument(
        "--sweep-headroom-range",
        type=a.arg(_range),
        default=(0.5, 8.0),
        metavar="LOW,HIGH",
        help="headroom searched for every policy: target = calibrated capacity / headroom (default 0.5,8)",
    )
    g.add_argument(
        "--sweep-scale-down-windows",
        type=a.listed(a.non_negative_float),
        default=[60.0, 300.0],
        help="scaleDown stabilization, s, for every policy (default 60,300)",
    )
    _token_sweep_options(g)
    g.add_argument(
        "--sweep-rps-windows",
        type=a.listed(a.positive_int),
        default=[30, 60],
        help="rps: request-rate windows, s (default 30,60)",
    )
    g.add_argument(
        "--sweep-rate-windows",
        type=a.listed(a.positive_int),
        default=[60, 120],
        help="prometheus: rate() windows, s (default 60,120)",
    )
    g.add_argument(
        "--slo-goal",
        type=a.arg(a.fraction),
        default=0.9,
        help="attainment (every SLO) the recommendation must reach (default 0.9)",
    )


def _token_sweep_options(g: argparse._ArgumentGroup) -> None:
    """The token policy's variants in a sweep."""
    g.add_argument(
        "--sweep-windows",
        type=a.listed(a.positive_int),
        default=[30, 60, 120],
        help="token: windowSeconds (default 30,60,120: the rate windows the other policies get)",
    )
    g.add_argument(
        "--sweep-panic",
        type=a.listed(a.arg(parse_panic)),
        default=[(6, 2.0, None), (6, PANIC_OFF, None)],
        help="token: panic WINDOW:THRESHOLD[:HOLD] or off (default 6:2,off)",
    )
    g.add_argument(
        "--sweep-burst",
        type=a.listed(a.arg(parse_burst)),
        default=[None, (10, 0.9, 1200)],
        help="token: burst envelope WINDOW:QUANTILE[:LOOKBACK] or off (default off,10:0.9:1200)",
    )
    g.add_argument(
        "--sweep-inflight",
        type=a.listed(_on_off),
        default=["off"],
        help="token: the in-flight floor (inFlightPerReplica = the replica's sequence slots / "
        "headroom, the concurrency policy's target) off, on or off,on (default off)",
    )
    g.add_argument(
        "--sweep-arrival-margins",
        type=a.listed(_margin),
        default=["0", "off"],
        help="token: arrivalMargin, fractions or off (default 0,off: the higher of the arrival and "
        "served rates, and the served rate alone)",
    )
    g.add_argument(
        "--sweep-size-windows",
        type=a.listed(_size_window),
        default=[0],
        help="token: sizeWindowSeconds, 0 (the token rate) or whole minutes in seconds, e.g. 0,3600 "
        "(arriving requests x their size over that span, with the first arrival margin only; "
        "default 0)",
    )


def _range(raw: str) -> tuple[float, float]:
    low, sep, high = raw.partition(",")
    if not sep:
        raise ValueError("expected LOW,HIGH")
    lo, hi = float(low), float(high)
    if not 0 < lo < hi:
        raise ValueError("expected 0 < LOW < HIGH")
    return lo, hi


def _margin(raw: str) -> str:
    value = raw.strip().lower()
    if value != "off" and not 0 <= float(value) <= 10:
        raise ValueError("expected a fraction from 0 to 10 or off")
    return value


def _size_window(raw: str) -> int:
    """A ``sizeWindowSeconds``, read as the ScaledObject metadata reads it."""
    try:
        value: int = SPEC["sizeWindowSeconds"].read("sizeWindowSeconds", raw)
    except MetadataError as exc:
        raise ValueError(str(exc)) from None
    return value


def _on_off(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("on", "off"):
        raise ValueError("expected on or off")
    return value


def _policy_name(raw: str) -> str:
    if raw not in POLICIES:
        raise ValueError(f"unknown policy; expected one of {', '.join(POLICIES)}")
    return raw
