"""``token-scaler simulate``: replay a request trace through a model of a Kubernetes
Deployment scaled by KEDA + HPA, under several scaling policies side by side.

Example::

    token-scaler simulate --trace azure-llm-inference-2023-code.csv --scale 4 \\
        --cold-start 120 --json out.json --plot out.png --sweep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scaler.metadata import ScalerSettings, parse
from token_scaler.errors import ConfigError, MetadataError
from tuning import args as a
from tuning.engine import RunResult, SimConfig, simulate
from tuning.hpa import HpaSettings
from tuning.metrics import Slo, summarize
from tuning.policies import (
    POLICY_NAMES,
    ConcurrencyPolicy,
    FixedPolicy,
    Policy,
    PrometheusRatePolicy,
    RequestRatePolicy,
    TokenPolicy,
)
from tuning.replica import ReplicaProfile, load_profile, saturated_throughput
from tuning.report import fmt, percent, table
from tuning.sweep import Point, grid, panic_label, pareto, parse_panic, recommend
from tuning.trace import Trace, load_csv, load_sample, sample_path

WORKLOAD = ("default", "llm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="token-scaler simulate",
        description="Replay a request trace through a simulated Deployment under KEDA + HPA and "
        "compare scaling policies: GPU-hours, cost, SLO attainment, latency, queues, replicas.",
    )
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
    g = p.add_argument_group("KEDA and HPA")
    g.add_argument(
        "--min-replicas", type=a.arg(a.non_negative_int), default=1, help="minReplicaCount (default 1)"
    )
    g.add_argument("--max-replicas", type=a.positive_int, default=40, help="maxReplicaCount (default 40)")
    g.add_argument(
        "--initial-replicas",
        type=a.arg(a.non_negative_int),
        help="ready at the start (default: min, at least 1)",
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
    g = p.add_argument_group("policies")
    g.add_argument(
        "--policies",
        type=a.listed(_policy_name),
        default=list(POLICY_NAMES),
        help=f"comma-separated, from {', '.join(POLICY_NAMES)} (default all)",
    )
    g.add_argument(
        "--metadata",
        type=a.key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="token policy: ScaledObject trigger metadata (repeat)",
    )
    g.add_argument(
        "--fixed-replicas",
        type=a.positive_int,
        help="also run a Deployment of this many replicas and no autoscaling (policy 'fixed')",
    )
    g.add_argument(
        "--rps-target",
        type=a.positive_float,
        help="requests/s per replica (default: capacity / mean request / headroom)",
    )
    g.add_argument(
        "--rps-window", type=a.positive_int, default=60, help="request-rate window, s (default 60)"
    )
    g.add_argument(
        "--concurrency-target",
        type=a.positive_float,
        help="requests in flight per replica (default: max concurrency / headroom)",
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
    g = p.add_argument_group("results")
    g.add_argument(
        "--ttft-slo", type=a.positive_float, default=2.0, help="time to first token target, s (default 2)"
    )
    g.add_argument(
        "--e2e-slo", type=a.positive_float, default=20.0, help="end-to-end latency target, s (default 20)"
    )
    g.add_argument("--json", type=Path, help="write every figure (and the sweep) here")
    g.add_argument("--plot", type=Path, help="write a PNG here (and <name>-sweep.png with --sweep)")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g = p.add_argument_group("sweep (token policy)")
    g.add_argument(
        "--sweep", action="store_true", help="also run the token policy over a grid; print the Pareto front"
    )
    g.add_argument(
        "--sweep-windows",
        type=a.listed(a.positive_int),
        default=[30, 60, 120],
        help="windowSeconds (default 30,60,120)",
    )
    g.add_argument(
        "--sweep-headrooms",
        type=a.listed(a.positive_float),
        default=[1.0, 1.15, 1.3, 1.6, 2.0],
        help="headroom (default 1,1.15,1.3,1.6,2)",
    )
    g.add_argument(
        "--sweep-panic",
        type=a.listed(a.arg(parse_panic)),
        default=[(6, 2.0), (10, 3.0), (6, 1e9)],
        help="WINDOW:THRESHOLD or off (default 6:2,10:3,off)",
    )
    g.add_argument(
        "--sweep-scale-down-windows",
        type=a.listed(a.non_negative_float),
        default=[60.0, 120.0, 300.0],
        help="scaleDown stabilization, s (default 60,120,300)",
    )
    g.add_argument(
        "--slo-goal",
        type=a.arg(a.fraction),
        default=0.99,
        help="attainment (both SLOs) the recommendation must reach (default 0.99)",
    )
    return p


def _policy_name(raw: str) -> str:
    if raw not in POLICY_NAMES:
        raise ValueError(f"unknown policy; expected one of {', '.join(POLICY_NAMES)}")
    return raw


@dataclass(frozen=True)
class Setup:
    trace: Trace
    config: SimConfig
    metadata: dict[str, str]
    settings: ScalerSettings
    rps_target: float
    concurrency_target: float
    capacity_note: str
    slo: Slo


def _settings(metadata: dict[str, str]) -> ScalerSettings:
    try:
        return parse(metadata, *WORKLOAD)
    except MetadataError as exc:
        raise ConfigError(f"--metadata: {exc}") from None


def prepare(ns: argparse.Namespace) -> Setup:
    trace = load_csv(ns.trace) if ns.trace else load_sample()
    trace = trace.transformed(speedup=ns.speedup, scale=ns.scale, seed=ns.seed)
    profile = load_profile(ns.replica_profile) if ns.replica_profile else ReplicaProfile()
    overrides: dict[str, Any] = {}
    for flag, name in (
        ("cold_start", "cold_start_s"),
        ("price_per_hour", "price_per_hour"),
        ("max_concurrency", "max_concurrency"),
        ("max_queue", "max_queue"),
    ):
        if getattr(ns, flag) is not None:
            overrides[name] = getattr(ns, flag)
    try:
        profile = replace(profile, **overrides)
        hpa = HpaSettings(
            min_replicas=ns.min_replicas,
            max_replicas=ns.max_replicas,
            tolerance=ns.tolerance,
            sync_s=ns.sync_period,
            polling_s=ns.polling_interval,
            cooldown_s=ns.cooldown,
            use_cached_metrics=ns.use_cached_metrics,
        ).with_scale_down_window(ns.scale_down_window)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    hpa = replace(hpa, scale_up=replace(hpa.scale_up, stabilization_s=ns.scale_up_window))
    config = SimConfig(profile, hpa, ns.initial_replicas, ns.timeout, ns.grace)

    pw, gw = profile.suggested_weights()
    if profile.prompt_weight is not None and profile.generation_weight is not None:
        pw, gw = profile.prompt_weight, profile.generation_weight
    metadata = {"promptWeight": f"{pw:g}", "generationWeight": f"{gw:g}"}
    user = dict(ns.metadata)
    metadata.update({k: v for k, v in user.items() if k in ("promptWeight", "generationWeight")})
    weights = _settings({**metadata, "tokensPerSecondPerReplica": "1"})
    pw, gw = weights.prompt_weight, weights.generation_weight
    if profile.tokens_per_second_per_replica is not None:
        capacity = profile.tokens_per_second_per_replica
        note = f"tokensPerSecondPerReplica {capacity:.0f} from {profile.source}"
    else:
        sp, sg = saturated_throughput(profile, trace.prompt, trace.generated)
        capacity = pw * sp + gw * sg
        note = (
            f"tokensPerSecondPerReplica {capacity:.0f} = the model replica's saturated throughput "
            f"for this trace's mix ({sp:.0f} prompt + {sg:.0f} generated tokens/s, weights {pw:g}/{gw:g})"
        )
    metadata["tokensPerSecondPerReplica"] = f"{capacity:.0f}"
    metadata.update(user)
    settings = _settings(metadata)
    mean_p, mean_g = trace.mean_tokens()
    per_request = settings.prompt_weight * mean_p + settings.generation_weight * mean_g
    rps = ns.rps_target or settings.tokens_per_second_per_replica / per_request / settings.headroom
    conc = ns.concurrency_target or profile.max_concurrency / settings.headroom
    return Setup(trace, config, metadata, settings, rps, conc, note, Slo(ns.ttft_slo, ns.e2e_slo))


def make_policy(name: str, setup: Setup, ns: argparse.Namespace, headroom: float | None = None) -> Policy:
    """The named policy; ``headroom`` rescales a baseline's target as the token policy's headroom does."""
    s = setup.settings
    factor = 1.0 if headroom is None else s.headroom / headroom
    if name == "token":
        return TokenPolicy(s)
    if name == "rps":
        return RequestRatePolicy(setup.rps_target * factor, ns.rps_window)
    if name == "concurrency":
        return ConcurrencyPolicy(setup.concurrency_target * factor)
    return PrometheusRatePolicy(
        s.target * factor, s.prompt_weight, s.generation_weight, ns.scrape_interval, ns.rate_window
    )


def fixed_config(config: SimConfig, replicas: int) -> SimConfig:
    hpa = replace(config.hpa, min_replicas=replicas, max_replicas=replicas)
    return replace(config, hpa=hpa, initial_replicas=replicas)


def _fixed_points(setup: Setup, ns: argparse.Namespace) -> list[Point]:
    """Static provisioning at 1..maxReplicas pods (about 20 counts)."""
    top = setup.config.hpa.max_replicas
    counts = sorted(set(range(1, top + 1, max(1, top // 20))) | {top})
    points = []
    for k, n in enumerate(counts, start=1):
        if not ns.quiet:
            print(f"\rfixed replicas {k}/{len(counts)}", end="", file=sys.stderr, flush=True)
        _, summary = run_one(setup, FixedPolicy(n), fixed_config(setup.config, n))
        points.append(
            Point(
                {"policy": "fixed", "replicas": str(n)},
                0.0,
                summary["gpu_hours"],
                summary["slo_both"],
                summary,
            )
        )
    if not ns.quiet:
        print(file=sys.stderr)
    return points


def _baseline_points(setup: Setup, ns: argparse.Namespace) -> dict[str, list[Point]]:
    """The other policies over the same headrooms and scale-down windows, for a fair comparison."""
    out: dict[str, list[Point]] = {}
    names = [n for n in ns.policies if n != "token"]
    total = len(names) * len(ns.sweep_headrooms) * len(ns.sweep_scale_down_windows)
    k = 0
    for name in names:
        out[name] = []
        for headroom in ns.sweep_headrooms:
            for down in ns.sweep_scale_down_windows:
                k += 1
                if not ns.quiet:
                    print(f"\rsweep of the other policies {k}/{total}", end="", file=sys.stderr, flush=True)
                config = replace(setup.config, hpa=setup.config.hpa.with_scale_down_window(down))
                _, summary = run_one(setup, make_policy(name, setup, ns, headroom), config)
                settings = {"policy": name, "headroom": f"{headroom:g}"}
                out[name].append(Point(settings, down, summary["gpu_hours"], summary["slo_both"], summary))
    if total and not ns.quiet:
        print(file=sys.stderr)
    return out


def _comparison(fronts: dict[str, list[Point]], goal: float) -> tuple[str, list[dict[str, Any]]]:
    """Per policy: the fewest GPU-hours that reach each attainment level."""
    levels = sorted({0.8, 0.9, 0.95, goal})
    rows, data = [], []
    for name, points in fronts.items():
        cheapest: dict[str, float | None] = {}
        for level in levels:
            meeting = [p.gpu_hours for p in points if p.attainment >= level]
            cheapest[f"{level:g}"] = min(meeting) if meeting else None
        top = max(points, key=lambda p: (p.attainment, -p.gpu_hours))
        data.append(
            {
                "policy": name,
                "gpu_hours_to_reach": cheapest,
                "best_attainment": top.attainment,
                "best_attainment_gpu_hours": top.gpu_hours,
            }
        )
        rows.append(
            [name]
            + [fmt(v, ".2f") for v in cheapest.values()]
            + [percent(top.attainment), f"{top.gpu_hours:.2f}"]
        )
    headers = ["policy"] + [f"GPU-h for {100 * level:g}%" for level in levels] + ["best", "at GPU-h"]
    return table(headers, rows), data


def run_one(
    setup: Setup, policy: Policy, config: SimConfig | None = None
) -> tuple[RunResult, dict[str, Any]]:
    started = time.process_time()
    result = simulate(setup.trace, policy, config or setup.config)
    summary = summarize(result, setup.slo)
    summary["cpu_s"] = round(time.process_time() - started, 2)
    return result, summary


def policy_table(summaries: Sequence[dict[str, Any]]) -> str:
    headers = [
        "policy", "GPU-h", "cost", "TTFT SLO", "E2E SLO", "both", "TTFT p50", "p95", "p99",
        "queue avg", "max", "replicas avg", "max", "rejected", "dropped", "cpu s",
    ]  # fmt: skip
    rows = [
        [
            s["policy"],
            fmt(s["gpu_hours"], ".2f"),
            fmt(s["cost"], ".2f"),
            percent(s["slo_ttft"]),
            percent(s["slo_e2e"]),
            percent(s["slo_both"]),
            fmt(s["ttft_p50"], ".2f"),
            fmt(s["ttft_p95"], ".2f"),
            fmt(s["ttft_p99"], ".2f"),
            fmt(s["queue_mean"], ".1f"),
            fmt(s["queue_max"]),
            fmt(s["replicas_mean"], ".1f"),
            fmt(s["replicas_max"]),
            fmt(s["rejected"]),
            fmt(s["dropped"]),
            fmt(s["cpu_s"], ".2f"),
        ]
        for s in summaries
    ]
    return table(headers, rows)


def _header(setup: Setup, ns: argparse.Namespace) -> list[str]:
    tr, cfg = setup.trace, setup.config
    p, h = cfg.replica, cfg.hpa
    lines = [
        f"trace: {tr.source} - {len(tr)} requests over {tr.duration_s / 60:.1f} min "
        f"(speedup x{ns.speedup:g}, load x{ns.scale:g}, seed {ns.seed})",
    ]
    if tr.attribution:
        lines.append(f"       data: {tr.attribution}")
    lines += [
        f"replica: {p.source}; cold start {p.cold_start_s:g}s, {p.max_concurrency} sequences, "
        f"{p.prefill_tokens_per_s:g} prompt tokens/s, step {1000 * p.step_base_s:g} ms + "
        f"{1000 * p.step_per_seq_s:g} ms/sequence, ${p.price_per_hour:g}/replica-hour",
        f"KEDA/HPA: replicas {h.min_replicas}..{h.max_replicas}, poll {h.polling_s:g}s, sync {h.sync_s:g}s, "
        f"tolerance {h.tolerance:g}, scale-up max(4 pods, 100%)/15s, scale-down stabilization "
        f"{h.scale_down.stabilization_s:g}s",
        f"capacity: {setup.capacity_note}",
        f"SLO: TTFT <= {setup.slo.ttft_s:g}s, end-to-end <= {setup.slo.e2e_s:g}s "
        f"(rejected and dropped requests count as misses); clients give up after {cfg.timeout_s:g}s queued",
    ]
    return lines


def _sweep(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    combos = grid(
        setup.metadata, ns.sweep_windows, ns.sweep_headrooms, ns.sweep_panic, ns.sweep_scale_down_windows
    )
    points: list[Point] = []
    for k, (metadata, down) in enumerate(combos, start=1):
        if not ns.quiet:
            print(f"\rsweep {k}/{len(combos)}", end="", file=sys.stderr, flush=True)
        config = replace(setup.config, hpa=setup.config.hpa.with_scale_down_window(down))
        _, summary = run_one(setup, TokenPolicy(_settings(metadata)), config)
        points.append(Point(metadata, down, summary["gpu_hours"], summary["slo_both"], summary))
    if not ns.quiet:
        print(file=sys.stderr)
    front = pareto(points)
    best = recommend(front, ns.slo_goal)
    others = _baseline_points(setup, ns)
    others["fixed"] = _fixed_points(setup, ns)
    comparison_text, comparison = _comparison({"token": points, **others}, ns.slo_goal)

    def label(point: Point) -> str:
        m = point.metadata
        panic = panic_label(int(m["panicWindowSeconds"]), float(m["panicThreshold"]))
        return f"w{m['windowSeconds']} h{m['headroom']} p{panic} d{point.scale_down_window_s:g}"

    rows = [
        [
            m["windowSeconds"],
            m["headroom"],
            panic_label(int(m["panicWindowSeconds"]), float(m["panicThreshold"])),
            f"{pt.scale_down_window_s:g}",
            f"{pt.gpu_hours:.2f}",
            percent(pt.summary["slo_ttft"]),
            percent(pt.attainment),
            fmt(pt.summary["ttft_p95"], ".2f"),
            "<- recommended" if pt is best else "",
        ]
        for pt in front
        for m in [pt.metadata]
    ]
    text = table(
        [
            "windowSeconds",
            "headroom",
            "panic",
            "scaleDown window",
            "GPU-h",
            "TTFT SLO",
            "both",
            "TTFT p95",
            "",
        ],
        rows,
    )
    out: dict[str, Any] = {
        "goal": ns.slo_goal,
        "points": [
            {"metadata": p.metadata, "scale_down_window_s": p.scale_down_window_s, **p.summary}
            for p in points
        ],
        "front": [label(p) for p in front],
        "recommended": None,
        "table": text,
        "baselines": {
            name: [
                {"parameters": p.metadata, "scale_down_window_s": p.scale_down_window_s, **p.summary}
                for p in pts
            ]
            for name, pts in others.items()
        },
        "comparison": comparison,
        "comparison_table": comparison_text,
    }
    if best is not None:
        out["recommended"] = {
            "metadata": best.metadata,
            "scale_down_window_s": best.scale_down_window_s,
            "gpu_hours": best.gpu_hours,
            "slo_both": best.attainment,
            "meets_goal": best.attainment >= ns.slo_goal,
        }
    if ns.plot:
        from tuning import plots

        plots.pareto(
            [(p.gpu_hours, p.attainment, "") for p in points],
            [(p.gpu_hours, p.attainment, label(p)) for p in front],
            {name: [(p.gpu_hours, p.attainment) for p in pareto(pts)] for name, pts in others.items()},
            ns.plot.with_name(ns.plot.stem + "-sweep.png"),
            f"token policy sweep: {len(points)} settings",
            setup.trace.attribution,
        )
    return out


def _recommendation_text(rec: dict[str, Any], goal: float) -> str:
    m = rec["metadata"]
    keys = (
        "tokensPerSecondPerReplica",
        "headroom",
        "windowSeconds",
        "panicWindowSeconds",
        "panicThreshold",
        "promptWeight",
        "generationWeight",
    )
    lines = [
        ("recommended" if rec["meets_goal"] else f"no setting reached {100 * goal:g}%; the highest")
        + f": {rec['gpu_hours']:.2f} GPU-h at {100 * rec['slo_both']:.1f}% of requests within both SLOs",
        "  triggers[0].metadata:",
    ]
    lines += [f'    {k}: "{m[k]}"' for k in keys if k in m]
    lines += [
        "  advanced.horizontalPodAutoscalerConfig.behavior.scaleDown:",
        f"    stabilizationWindowSeconds: {rec['scale_down_window_s']:g}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup = prepare(ns)
    summaries: list[dict[str, Any]] = []
    results: list[RunResult] = []
    for name in ns.policies:
        if not ns.quiet:
            print(f"simulating {name} ...", file=sys.stderr, flush=True)
        policy = make_policy(name, setup, ns)
        result, summary = run_one(setup, policy)
        results.append(result)
        summaries.append(summary)
    if ns.fixed_replicas:
        n = ns.fixed_replicas
        result, summary = run_one(setup, FixedPolicy(n), fixed_config(setup.config, n))
        results.append(result)
        summaries.append(summary)
    print("\n".join(_header(setup, ns)))
    print()
    for s in summaries:
        print(f"  {s['policy']:<12} {s['settings']}")
    print()
    print(policy_table(summaries))
    report: dict[str, Any] = {
        "trace": {
            "source": setup.trace.source,
            "attribution": setup.trace.attribution,
            "requests": len(setup.trace),
            "duration_s": setup.trace.duration_s,
            "speedup": ns.speedup,
            "scale": ns.scale,
            "seed": ns.seed,
        },
        "replica": setup.config.replica.to_json(),
        "hpa": {
            "min_replicas": setup.config.hpa.min_replicas,
            "max_replicas": setup.config.hpa.max_replicas,
            "tolerance": setup.config.hpa.tolerance,
            "sync_s": setup.config.hpa.sync_s,
            "polling_s": setup.config.hpa.polling_s,
            "scale_down_window_s": setup.config.hpa.scale_down.stabilization_s,
            "scale_up_window_s": setup.config.hpa.scale_up.stabilization_s,
        },
        "slo": {"ttft_s": setup.slo.ttft_s, "e2e_s": setup.slo.e2e_s},
        "token_metadata": setup.metadata,
        "policies": summaries,
        "timelines": {
            r.policy: {k: v.tolist() for k, v in r.timeline.items() if k in ("t", "pods", "queue")}
            for r in results
        },
    }
    if ns.plot and results:
        from tuning import plots

        plots.simulation(
            results,
            ns.plot,
            f"{Path(setup.trace.source).name}: load x{ns.scale:g}, "
            f"cold start {setup.config.replica.cold_start_s:g}s",
            setup.trace.attribution,
        )
        print(f"\nplot: {ns.plot}")
    if ns.sweep:
        sweep = _sweep(setup, ns)
        report["sweep"] = {k: v for k, v in sweep.items() if k not in ("table", "comparison_table")}
        print(
            "\nsweep of the token policy: Pareto front of GPU-hours vs attainment of both SLOs "
            f"({len(sweep['points'])} settings)"
        )
        print(sweep["table"])
        print(
            "\nevery policy over the same headrooms (a baseline's target x default headroom / headroom) "
            "and scale-down windows, and 'fixed' = N replicas without autoscaling, N = 1..max: "
            "the fewest GPU-hours that reach each attainment of both SLOs"
        )
        print(sweep["comparison_table"])
        if sweep["recommended"] is not None:
            print()
            print(_recommendation_text(sweep["recommended"], ns.slo_goal))
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=1))
        print(f"\njson: {ns.json}")
    return 0
