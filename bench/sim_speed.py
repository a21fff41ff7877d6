"""How much CPU ``token-scaler simulate`` spends per request, per policy run.

    python -m bench.sim_speed [--days 1 --mean-rps 4 --seed 5 --mix steady] [--rounds 1] [--against OLD.json]
    python -m bench.sim_speed --traces code --profile token     # where one run's time goes

Traces: ``code``, the shipped Azure code hour (token_scaler/data), and ``day``, a synthesized
trace (``tuning.synth.generate`` with ``--days``/``--mean-rps``/``--seed``/``--mix``, written to a CSV
and read back, as ``token-scaler synthesize`` and ``simulate --trace`` do). Each trace is set
up as ``simulate`` sets it up (calibration, warm start), then each policy is run once per
round (token, rps, concurrency, prometheus at their calibrated targets; fixed at twice the
replicas the trace's mean demand needs): CPU (process) time of ``simulate`` + ``summarize``,
per request. Baselines in the same run, per request: pushing and popping every arrival
through a ``heapq``, and ``numpy.sort`` of the arrival times; and, when the modules
``setup.py`` compiles are compiled (``token_scaler.native``), the same measurement with them
run from source (``TOKEN_SCALER_NATIVE=0``) in a process of its own after this one's, with
the ratio of the two and a check that every summary figure is the same (``--engine this``
leaves it out). Of the token policy's cost, the part spent in the scaler's own code
(``WorkloadSeries.add_flushes``/``add_all`` of each second's sidecar records, ``evaluate`` at
each sync) is timed in a run of its own.

Results: printed and written to bench/results/sim-speed.json, with every run's summary
(GPU-hours, SLO attainment, latency percentiles, drops); ``--against`` an earlier such file
prints every summary figure that differs from it (the identical-results check).
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import json
import math
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench._common import RESULTS, percentiles
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from token_scaler import native
from tuning import policies as policy_module
from tuning import simulate as cli
from tuning.policies import FixedPolicy, TokenPolicy
from tuning.registry import make
from tuning.simulate_options import build_parser
from tuning.synth import SynthConfig, generate
from tuning.synthesize import write_csv
from tuning.trace import sample_path

POLICIES = ("token", "rps", "concurrency", "prometheus", "fixed")
CODE_HOUR = sample_path().with_name("azure-llm-inference-2023-code.csv")
Run = Callable[[], dict[str, Any]]


def fixed_replicas(setup: cli.Setup) -> int:
    """Twice the replicas the trace's mean weighted demand needs (within min/max)."""
    cal, trace = setup.cal, setup.trace
    demand = float(cal.weighted_tokens().sum()) / max(trace.duration_s, 1.0)
    hpa = setup.config.hpa
    return min(max(1, hpa.min_replicas, math.ceil(2 * demand / cal.capacity)), hpa.max_replicas)


def policy_run(setup: cli.Setup, name: str) -> Run:
    """One ``simulate`` run of ``name`` as the CLI makes it, returning its summary."""
    if name == "fixed":
        n = fixed_replicas(setup)
        return lambda: cli.run_one(setup, FixedPolicy(n), cli.fixed_config(setup.config, n))[1]
    return lambda: cli.run_one(setup, make(name, setup.cal))[1]


def heap_baseline(arrival: np.ndarray[Any, Any]) -> None:
    heap: list[tuple[float, int]] = []
    for i, t in enumerate(arrival.tolist()):
        heapq.heappush(heap, (t, i))
    while heap:
        heapq.heappop(heap)


def cpu_timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    result = action()
    return time.process_time() - started, result


def _timed(spent: list[float], function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, its thread CPU time added to ``spent[0]``."""
    started = time.thread_time()
    try:
        return function(*args)
    finally:
        spent[0] += time.thread_time() - started


class _TimedSeries:
    """A ``WorkloadSeries`` whose ingest is timed: the policy's series, wrapped (a compiled
    class takes no patched methods)."""

    def __init__(self, series: WorkloadSeries, spent: list[float]) -> None:
        self._series = series
        self._spent = spent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._series, name)

    def add_flushes(self, *args: Any) -> Any:
        return _timed(self._spent, self._series.add_flushes, *args)

    def add_all(self, *args: Any) -> Any:
        return _timed(self._spent, self._series.add_all, *args)


def scaler_share(setup: cli.Setup) -> float:
    """CPU seconds a token run spends in the scaler's own code, which the policy runs as the
    scaler does: ``WorkloadSeries.add_flushes``/``add_all`` of every second's sidecar records and
    ``evaluate`` at every sync. Timed around each call, in a run of its own (the timing adds to that run)."""
    spent = [0.0]
    policy = make("token", setup.cal)
    assert isinstance(policy, TokenPolicy)
    policy.series = cast(WorkloadSeries, _TimedSeries(policy.series, spent))
    # tuning.policies calls the name it imported: that is the one to wrap
    setattr(policy_module, "evaluate", lambda *args: _timed(spent, evaluate, *args))  # noqa: B010
    try:
        cli.run_one(setup, policy)
    finally:
        setattr(policy_module, "evaluate", evaluate)  # noqa: B010
    return spent[0]


def measure(setup: cli.Setup, policies: Sequence[str], rounds: int) -> dict[str, Any]:
    n = len(setup.trace)
    arrival = setup.trace.arrival_s
    shuffled = np.random.default_rng(0).permutation(arrival)
    baselines: dict[str, list[float]] = {"heapq push+pop": [], "numpy.sort": []}
    runs: dict[str, list[float]] = {name: [] for name in policies}
    summaries: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        baselines["heapq push+pop"].append(cpu_timed(lambda: heap_baseline(arrival))[0])
        baselines["numpy.sort"].append(cpu_timed(lambda: np.sort(shuffled))[0])
        for name in policies:
            seconds, summary = cpu_timed(policy_run(setup, name))
            runs[name].append(seconds)
            summaries[name] = {k: v for k, v in summary.items() if k != "cpu_s"}

    shares = {"token: scaler code": [scaler_share(setup)]} if "token" in policies else {}

    def per_request(samples: list[float]) -> dict[str, float]:
        return {k: v if k == "n" else round(v / n * 1e6, 2) for k, v in percentiles(samples, (50,)).items()}

    return {
        "requests": n,
        "duration_s": setup.trace.duration_s,
        "cpu_us_per_request": {name: per_request(s) for name, s in runs.items()},
        "baseline_us_per_request": {name: per_request(s) for name, s in baselines.items()},
        "of_which_us_per_request": {name: per_request(s) for name, s in shares.items()},
        "summaries": summaries,
    }


def setups(names: Sequence[str], config: SynthConfig, tmp: Path) -> dict[str, cli.Setup]:
    out = {}
    for name in names:
        if name == "code":
            path = CODE_HOUR
        else:
            path = tmp / "day.csv"
            write_csv(generate(config), path)
        out[name] = cli.prepare(build_parser().parse_args(["--trace", str(path), "--quiet"]))
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every summary figure of ``new`` that differs from the same run in ``old``."""
    lines = []
    for trace, result in new["traces"].items():
        before = old.get("traces", {}).get(trace, {}).get("summaries", {})
        for policy, summary in result["summaries"].items():
            if policy not in before:
                lines.append(f"{trace} {policy}: not in the earlier file")
                continue
            for key, value in summary.items():
                if before[policy].get(key) != value:
                    lines.append(f"{trace} {policy} {key}: {before[policy].get(key)} -> {value}")
    return lines


def source_run(argv: Sequence[str]) -> dict[str, Any]:
    """The measurement ``argv`` asks for with the compiled modules off (``TOKEN_SCALER_NATIVE=0``),
    in a process of its own: the plain-Python baseline of the same run."""
    forwarded = [a for i, a in enumerate(argv) if "--engine" not in (a, argv[i - 1] if i else "")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "source.json"
        command = [sys.executable, "-m", "bench.sim_speed", *forwarded, "--engine", "this", "--out", str(out)]
        env = {**os.environ, native.SWITCH: "0"}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def print_differences(label: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    changed = differences(old, new)
    print(f"{label}: " + ("every summary figure identical" if not changed else ""))
    for line in changed:
        print("  " + line)


def print_table(result: dict[str, Any], source: dict[str, Any] | None) -> None:
    """Per trace and run: µs per request (and against the plain-Python run, when there is one)."""
    against = f" {'source':>8} {'x':>6}" if source else ""
    head = f"{'trace':<6} {'requests':>9} {'run':<20} {'cpu us/req p50':>15}"
    print(f"{head}{against} {'GPU-h':>8} {'all SLOs':>9}")
    for trace, measured in result["traces"].items():
        n = measured["requests"]
        plain = source["traces"][trace] if source else {}
        for kind in ("cpu_us_per_request", "of_which_us_per_request", "baseline_us_per_request"):
            for name, cost in measured[kind].items():
                line = f"{trace:<6} {n:>9,} {name:<20} {cost['p50']:>15.2f}"
                if source:
                    base = plain[kind][name]["p50"]
                    line += f" {base:>8.2f} {base / cost['p50']:>6.2f}"
                summary = measured["summaries"].get(name) if kind == "cpu_us_per_request" else None
                if summary is not None:
                    line += f" {summary['gpu_hours']:>8.3f} {summary['slo_both']:>9.4f}"
                print(line)


def profile(setup: cli.Setup, name: str) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(policy_run(setup, name))
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sim_speed", description=__doc__.splitlines()[0])
    p.add_argument("--traces", default="code,day", help="comma-separated: code, day (default both)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default all five)")
    p.add_argument("--days", type=float, default=1.0, help="days of the synthesized trace (default 1)")
    p.add_argument("--mean-rps", type=float, default=4.0, help="its mean requests/s (default 4)")
    p.add_argument("--seed", type=int, default=5, help="its seed (default 5)")
    p.add_argument("--mix", default="steady", help="its mix: steady or shifting (default steady)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each policy (default 1)")
    p.add_argument("--against", type=Path, help="an earlier sim-speed.json: print differing figures")
    p.add_argument(
        "--engine",
        choices=("both", "this"),
        default="both",
        help="both (default): with the compiled modules in use, also run them from source in a "
        "process of its own and report the ratio; this: only the modules this process runs",
    )
    p.add_argument("--profile", metavar="POLICY", help="cProfile one run of POLICY instead")
    p.add_argument("--out", type=Path, default=RESULTS / "sim-speed.json", help="where to write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    given = list(argv if argv is not None else sys.argv[1:])
    ns = parser().parse_args(given)
    policies = ns.policies.split(",")
    config = SynthConfig(days=ns.days, mean_rps=ns.mean_rps, seed=ns.seed, mix=ns.mix)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = setups(ns.traces.split(","), config, Path(tmp))
    if ns.profile:
        for setup in prepared.values():
            profile(setup, ns.profile)
        return 0
    synthesized = {"days": ns.days, "mean_rps": ns.mean_rps, "seed": ns.seed, "mix": ns.mix}
    compiled = native.compiled_in_use()
    result: dict[str, Any] = {"synthesized": synthesized, "compiled": compiled, "traces": {}}
    for trace, setup in prepared.items():
        result["traces"][trace] = measure(setup, policies, ns.rounds)
    source = source_run(given) if compiled and ns.engine == "both" else None
    if source:
        result["source"] = source
    state = "compiled" if compiled else "plain Python (not compiled)"
    print(f"modules {', '.join(native.COMPILED)}: {state}")
    if compiled and not source:
        print("(--engine both adds the plain-Python run as the baseline, 'source', and its ratio 'x')")
    print_table(result, source)
    if source:
        print_differences("compiled against source", source, result)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"json: {ns.out}")
    if ns.against:
        print_differences(f"against {ns.against}", json.loads(ns.against.read_text()), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
