"""``token-scaler simulate``: replay a request trace through a model of a Kubernetes
Deployment scaled by KEDA + HPA, under several scaling policies side by side.

Example::

    token-scaler simulate --trace azure-llm-inference-2023-code.csv --scale 4 \\
        --cold-start 120 --json out.json --plot out.png --sweep
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scaler.metadata import ScalerSettings
from token_scaler import native
from token_scaler.errors import ConfigError
from tuning.compare import comparison_table, to_json, verdict
from tuning.engine import RunResult, SimConfig, simulate
from tuning.hpa import HpaSettings
from tuning.metrics import Slo, summarize
from tuning.policies import FixedPolicy, Policy
from tuning.registry import BOUNDS, RUNNABLE, Calibration, make, token_metadata, token_settings
from tuning.replica import ReplicaProfile, load_profile, saturated_throughput
from tuning.report import fmt, percent, table
from tuning.search import Search
from tuning.simulate_options import build_parser
from tuning.sweep import PANIC_OFF, burst_variant, panic_variant
from tuning.trace import Trace, load_csv, load_sample
from tuning.workers import in_order


@dataclass(frozen=True)
class Setup:
    trace: Trace
    config: SimConfig
    cal: Calibration
    capacity_note: str
    slo: Slo

    @property
    def settings(self) -> ScalerSettings:
        return token_settings(self.cal.metadata)


def _replica_profile(ns: argparse.Namespace) -> ReplicaProfile:
    profile = load_profile(ns.replica_profile) if ns.replica_profile else ReplicaProfile()
    overrides: dict[str, Any] = {}
    for flag, name in (
        ("cold_start", "cold_start_s"),
        ("price_per_hour", "price_per_hour"),
        ("max_concurrency", "max_concurrency"),
        ("max_queue", "max_queue"),
        ("kv_cache_tokens", "kv_cache_tokens"),
    ):
        if getattr(ns, flag) is not None:
            overrides[name] = getattr(ns, flag)
    try:
        return replace(profile, **overrides)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _hpa(ns: argparse.Namespace) -> HpaSettings:
    try:
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
    return replace(hpa, scale_up=replace(hpa.scale_up, stabilization_s=ns.scale_up_window))


def warm_start(trace: Trace, capacity: float, pw: float, gw: float, seconds: float, hpa: HpaSettings) -> int:
    """The replicas that serve the first ``seconds`` of the trace at capacity: where every
    autoscaler starts, so none pays for a cold fleet under full load that a warm fixed
    deployment does not."""
    head = trace.head(seconds)
    rate = float((pw * head.prompt + gw * head.generated).sum()) / seconds
    return min(max(1, hpa.min_replicas, math.ceil(rate / capacity)), hpa.max_replicas)


def prepare(ns: argparse.Namespace) -> Setup:
    trace = load_csv(ns.trace) if ns.trace else load_sample()
    trace = trace.transformed(speedup=ns.speedup, scale=ns.scale, seed=ns.seed)
    warm_up = min(ns.warm_up, trace.duration_s)
    profile = _replica_profile(ns)
    hpa = _hpa(ns)
    pw, gw = profile.suggested_weights()
    if profile.prompt_weight is not None and profile.generation_weight is not None:
        pw, gw = profile.prompt_weight, profile.generation_weight
    metadata = {"promptWeight": f"{pw:g}", "generationWeight": f"{gw:g}"}
    user = dict(ns.metadata)
    metadata.update({k: v for k, v in user.items() if k in ("promptWeight", "generationWeight")})
    weights = token_settings({**metadata, "tokensPerSecondPerReplica": "1"})
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
    trace = trace.with_warm_up(warm_up)
    token_settings(metadata)  # a bad --metadata fails here, naming the key
    lookahead = math.ceil(profile.cold_start_s + ns.lookahead_margin)
    cal = Calibration(
        trace, capacity, pw, gw, profile.max_concurrency, metadata, lookahead, ns.scrape_interval
    )
    initial = ns.initial_replicas
    if initial is None:
        initial = warm_start(trace, capacity, pw, gw, profile.cold_start_s + 60.0, hpa)
    try:
        config = SimConfig(
            profile,
            hpa,
            initial,
            ns.timeout,
            ns.grace,
            routing=ns.routing,
            generation_weight=gw / pw,
            measure_from_s=warm_up,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Setup(trace, config, cal, note, Slo(ns.ttft_slo, ns.tpot_slo, ns.e2e_slo))


def _variants(name: str, ns: argparse.Namespace, sweep: bool) -> list[dict[str, str]]:
    """The settings besides headroom that a policy is run with (several in a sweep)."""
    if name == "token":
        if not sweep:
            return [{}]
        return [
            {
                "windowSeconds": str(w),
                "panic": panic_variant(pw, pt, hold),
                "burst": burst_variant(burst),
                "inflight": inflight,
                "arrivalMargin": margin,
                **({"sizeWindowSeconds": str(size)} if size else {}),
            }
            for w in ns.sweep_windows
            for pw, pt, hold in ns.sweep_panic
            if pw <= w // 2
            for burst in ns.sweep_burst
            for inflight in ns.sweep_inflight
            for size in ns.sweep_size_windows
            # a sized window's demand is its arrivals whatever the margin (``scaler.size``),
            # which then applies only before the history knows a size: the first margin
            for margin in (ns.sweep_arrival_margins[:1] if size else ns.sweep_arrival_margins)
        ]
    if name == "rps":
        return [{"window": str(w)} for w in (ns.sweep_rps_windows if sweep else [ns.rps_window])]
    if name == "prometheus":
        return [{"window": str(w)} for w in (ns.sweep_rate_windows if sweep else [ns.rate_window])]
    return [{}]


def fixed_config(config: SimConfig, replicas: int) -> SimConfig:
    hpa = replace(config.hpa, min_replicas=replicas, max_replicas=replicas)
    return replace(config, hpa=hpa, initial_replicas=replicas)


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
        "policy", "GPU-h", "cost", "TTFT SLO", "TPOT SLO", "all SLOs", "TTFT p50", "p95", "p99",
        "TPOT p90", "queue avg", "max", "replicas avg", "max", "rejected", "dropped", "cpu s",
    ]  # fmt: skip
    rows = [
        [
            s["policy"],
            fmt(s["gpu_hours"], ".2f"),
            fmt(s["cost"], ".2f"),
            percent(s["slo_ttft"]),
            percent(s["slo_tpot"]),
            percent(s["slo_both"]),
            fmt(s["ttft_p50"], ".2f"),
            fmt(s["ttft_p95"], ".2f"),
            fmt(s["ttft_p99"], ".2f"),
            fmt(s["tpot_p90"], ".3f"),
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
    start = cfg.measure_from_s
    measured = int((tr.arrival_s >= start).sum())
    lines = [
        f"trace: {tr.source} - {measured} requests over {(tr.duration_s - start) / 60:.1f} min "
        f"(speedup x{ns.speedup:g}, load x{ns.scale:g}, seed {ns.seed})",
    ]
    if start > 0:
        lines.append(
            f"       warm-up {start:g}s: its last {start:g}s played first, not counted "
            f"({len(tr) - measured} requests)"
        )
    if tr.attribution:
        lines.append(f"       data: {tr.attribution}")
    lines += [
        f"replica: {p.source}; cold start {p.cold_start_s:g}s, {p.max_concurrency} sequences, "
        f"{p.prefill_tokens_per_s:g} prompt tokens/s, step {1000 * p.step_base_s:g} ms + "
        f"{1000 * p.step_per_seq_s:g} ms/sequence, ${p.price_per_hour:g}/replica-hour",
        f"KEDA/HPA: replicas {h.min_replicas}..{h.max_replicas}, every autoscaler starts with "
        f"{cfg.initial_replicas} ready, poll {h.polling_s:g}s, sync {h.sync_s:g}s, tolerance "
        f"{h.tolerance:g}, scale-up max(4 pods, 100%)/15s, scale-down stabilization "
        f"{h.scale_down.stabilization_s:g}s; routing {cfg.routing}",
        f"capacity: {setup.capacity_note}",
        f"SLO per request: {setup.slo.describe()} (rejected and dropped requests miss); "
        f"clients give up after {cfg.timeout_s:g}s queued",
    ]
    return lines


def _summary(setup: Setup, policy: Policy, config: SimConfig) -> dict[str, Any]:
    return run_one(setup, policy, config)[1]


def _fixed_summary(setup: Setup, replicas: int) -> dict[str, Any]:
    return run_one(setup, FixedPolicy(replicas), fixed_config(setup.config, replicas))[1]


def _sweep(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    levels = sorted({0.8, 0.9, 0.95, ns.slo_goal})
    search = Search(
        setup.cal,
        setup.config,
        functools.partial(_summary, setup),
        levels,
        ns.sweep_headroom_range,
        ns.sweep_scale_down_windows,
        progress=not ns.quiet,
        simulate_fixed=functools.partial(_fixed_summary, setup),
        max_replicas=setup.config.hpa.max_replicas,
        jobs=ns.jobs,
    )
    names = [n for n in ns.policies if n in RUNNABLE] + [n for n in BOUNDS]
    results = search.all([(name, _variants(name, ns, sweep=True)) for name in names], fixed=True)
    if not ns.quiet:
        print(file=sys.stderr)
    out: dict[str, Any] = {
        "goal": ns.slo_goal,
        "levels": levels,
        "headroom_range": list(ns.sweep_headroom_range),
        "scale_down_windows": ns.sweep_scale_down_windows,
        "policies": to_json(results, levels),
        "table": comparison_table(results, levels, ns.slo_goal, ns.sweep_headroom_range[0]),
        "verdict": [line for lv in levels for line in verdict(results, lv, RUNNABLE, "foresight")],
        "recommended": None,
    }
    token = results.get("token")
    best = token.cheapest(ns.slo_goal) if token else None
    if best is not None:
        variant = {k: v for k, v in best.settings.items() if k not in ("headroom", "scaleDownWindow")}
        out["recommended"] = {
            "metadata": token_metadata(setup.cal, float(best.settings["headroom"]), variant),
            "scale_down_window_s": float(best.settings["scaleDownWindow"]),
            "gpu_hours": best.gpu_hours,
            "slo_both": best.attainment,
            "meets_goal": True,
        }
    if ns.plot:
        from tuning import plots

        plots.pareto(
            {name: [(r.gpu_hours, r.attainment) for r in b.runs] for name, b in results.items()},
            ns.plot.with_name(ns.plot.stem + "-sweep.png"),
            f"every policy searched alike: {sum(len(b.runs) for b in results.values())} runs",
            setup.trace.attribution,
        )
    return out


def _recommendation_text(rec: dict[str, Any], goal: float) -> str:
    m = rec["metadata"]
    keys: tuple[str, ...] = (
        "tokensPerSecondPerReplica",
        "headroom",
        "windowSeconds",
        "panicWindowSeconds",
        "panicThreshold",
        "panicHoldSeconds",
        "burstWindowSeconds",
        "burstQuantile",
        "burstLookbackSeconds",
        "inFlightPerReplica",
        "arrivalMargin",
        "sizeWindowSeconds",
        "promptWeight",
        "generationWeight",
    )
    if m.get("burstWindowSeconds", "0") == "0":  # the envelope off: its keys are left out
        keys = tuple(k for k in keys if not k.startswith("burst"))
    lines = [
        f"token policy, cheapest reaching {100 * goal:g}%: {rec['gpu_hours']:.2f} GPU-h at "
        f"{100 * rec['slo_both']:.1f}% of requests within every SLO",
        "  triggers[0].metadata:",
    ]
    for k in keys:
        if k in m:
            off = k == "panicThreshold" and float(m[k]) >= PANIC_OFF
            lines.append(f'    {k}: "{m[k]}"' + ("  # no burst reaches it: panic off" if off else ""))
    lines += [
        "  advanced.horizontalPodAutoscalerConfig.behavior.scaleDown:",
        f"    stabilizationWindowSeconds: {rec['scale_down_window_s']:g}",
    ]
    return "\n".join(lines)


def _report(setup: Setup, ns: argparse.Namespace, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = setup.config
    return {
        "trace": {
            "source": setup.trace.source,
            "attribution": setup.trace.attribution,
            "requests": len(setup.trace),
            "duration_s": setup.trace.duration_s,
            "speedup": ns.speedup,
            "scale": ns.scale,
            "seed": ns.seed,
        },
        "replica": cfg.replica.to_json(),
        "hpa": {
            "min_replicas": cfg.hpa.min_replicas,
            "max_replicas": cfg.hpa.max_replicas,
            "initial_replicas": cfg.initial_replicas,
            "tolerance": cfg.hpa.tolerance,
            "sync_s": cfg.hpa.sync_s,
            "polling_s": cfg.hpa.polling_s,
            "scale_down_window_s": cfg.hpa.scale_down.stabilization_s,
            "scale_up_window_s": cfg.hpa.scale_up.stabilization_s,
        },
        "routing": cfg.routing,
        "slo": {"ttft_s": setup.slo.ttft_s, "tpot_s": setup.slo.tpot_s, "e2e_s": setup.slo.e2e_s},
        "token_metadata": setup.cal.metadata,
        "policies": summaries,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    note = native.source_note()
    if note and not ns.quiet:
        print(note, file=sys.stderr, flush=True)
    setup = prepare(ns)
    results, summaries = _run_policies(setup, ns)
    print("\n".join(_header(setup, ns)))
    print()
    for s in summaries:
        print(f"  {s['policy']:<18} {s['settings']}")
    print()
    print(policy_table(summaries))
    report = _report(setup, ns, summaries)
    report["timelines"] = {
        r.policy: {k: v.tolist() for k, v in r.timeline.items() if k in ("t", "pods", "ready", "queue")}
        for r in results
    }
    if ns.plot and results:
        _plot(setup, ns, results)
    if ns.sweep:
        report["sweep"] = _print_sweep(setup, ns)
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=1))
        print(f"\njson: {ns.json}")
    return 0


def _run_policies(setup: Setup, ns: argparse.Namespace) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """Each policy of ``--policy`` with its default settings, then ``--fixed-replicas`` if set;
    in ``--jobs`` worker processes, the results in that order."""
    runs: list[tuple[str, dict[str, str] | int]] = [
        (name, _variants(name, ns, sweep=False)[0]) for name in ns.policies
    ]
    if ns.fixed_replicas:
        runs.append(("fixed", ns.fixed_replicas))
    if not ns.quiet:
        names = ", ".join(name for name, _ in runs)
        jobs = min(ns.jobs, len(runs))
        print(f"simulating {names} ({jobs} at a time) ...", file=sys.stderr, flush=True)
    results: list[RunResult] = []
    summaries: list[dict[str, Any]] = []
    for result, summary in in_order(_run_policy, runs, ns.jobs, _set_worker_setup, setup):
        results.append(result)
        summaries.append(summary)
    return results, summaries


# The setup a process runs ``_run_policy`` on: set once, when it starts.
_setup: Setup | None = None


def _set_worker_setup(setup: Setup) -> None:
    global _setup
    _setup = setup


def _run_policy(run: tuple[str, dict[str, str] | int]) -> tuple[RunResult, dict[str, Any]]:
    """One run of ``_run_policies``: a policy with its variant, or ("fixed", replicas)."""
    assert _setup is not None, "_set_worker_setup runs first"
    name, how = run
    if isinstance(how, int):
        return run_one(_setup, FixedPolicy(how), fixed_config(_setup.config, how))
    return run_one(_setup, make(name, _setup.cal, None, how))


def _plot(setup: Setup, ns: argparse.Namespace, results: list[RunResult]) -> None:
    from tuning import plots

    plots.simulation(
        results,
        ns.plot,
        f"{Path(setup.trace.source).name}: load x{ns.scale:g}, "
        f"cold start {setup.config.replica.cold_start_s:g}s, routing {setup.config.routing}",
        setup.trace.attribution,
        setup.cal.capacity / setup.cal.prompt_weight,
        setup.slo,
    )
    print(f"\nplot: {ns.plot}")


def _print_sweep(setup: Setup, ns: argparse.Namespace) -> dict[str, Any]:
    """The sweep's table, verdict and recommendation printed; its report (the table left out)."""
    sweep = _sweep(setup, ns)
    lo, hi = ns.sweep_headroom_range
    print(
        f"\nevery policy searched alike: headroom {lo:g}..{hi:g} (target = calibrated capacity / "
        f"headroom), scale-down windows {', '.join(f'{d:g}s' for d in ns.sweep_scale_down_windows)}, "
        "each policy's own windows; fixed = the fewest replicas, searched over 1..maxReplicas. "
        "The fewest GPU-hours reaching each attainment of every SLO, read off a monotone fit of "
        "each setting family's runs (fixed: the fewest replicas; * = held by the range's edge), "
        "and the cheapest run at the goal:"
    )
    print(sweep["table"])
    print()
    print("\n".join(sweep["verdict"]))
    if sweep["recommended"] is not None:
        print()
        print(_recommendation_text(sweep["recommended"], ns.slo_goal))
    return {k: v for k, v in sweep.items() if k != "table"}
