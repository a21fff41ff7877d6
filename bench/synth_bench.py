"""How long ``token-scaler synthesize`` takes for a week of about a million requests.

    python -m bench.synth_bench [--days 7 --mean-rps 1.65 --rounds 5]

Per round, in this process: ``generate`` (envelope, arrivals, sizes and services), ``summarize``
and ``write_csv`` (to a temporary file), each as wall and CPU time. Baselines in the same run:
sorting as many uniform numbers as there are requests (what the arrival times cannot avoid)
and ``numpy.savetxt`` writing the same three columns. The size tables are read once before the
rounds (their time is printed apart). Results: printed and written to bench/results/synth.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bench._common import RESULTS, percentiles
from tuning.synth import SERVICES, SynthConfig, generate, service_sizes
from tuning.synthesize import summarize, write_csv

T = TypeVar("T")
Samples = dict[str, list[tuple[float, float]]]


def timed(samples: Samples, name: str, action: Callable[[], T]) -> T:
    """Run ``action``, add its wall and CPU seconds to ``samples[name]``, return its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = action()
    samples.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))
    return result


def one_round(samples: Samples, config: SynthConfig, path: Path, seed: int) -> int:
    synth = timed(samples, "generate", lambda: generate(config))
    timed(samples, "summarize", lambda: summarize(synth))
    timed(samples, "write_csv", lambda: write_csv(synth, path))
    n, rng = len(synth.trace), np.random.default_rng(seed)
    timed(samples, "baseline: sort N uniforms", lambda: np.sort(rng.uniform(0, 1, n)))
    t = synth.trace
    columns = np.column_stack([t.arrival_s, t.prompt, t.generated])
    fmt = ("%.3f", "%d", "%d")
    timed(samples, "baseline: numpy.savetxt", lambda: np.savetxt(path, columns, fmt=fmt, delimiter=","))
    return n


def run(config: SynthConfig, rounds: int) -> dict[str, Any]:
    load: Samples = {}
    timed(load, "sizes", lambda: [service_sizes(name) for name in SERVICES])
    samples: Samples = {}
    with tempfile.TemporaryDirectory() as tmp:
        requests = [
            one_round(samples, replace(config, seed=config.seed + index), Path(tmp) / "week.csv", index)
            for index in range(rounds)
        ]
    stages = {
        name: {
            "wall": percentiles([w for w, _ in values], (50,)),
            "cpu": percentiles([c for _, c in values], (50,)),
        }
        for name, values in samples.items()
    }
    return {
        "config": asdict(config),
        "requests": requests,
        "load_sizes_s": load["sizes"][0],
        "stages": stages,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--mean-rps", type=float, default=1.65)
    p.add_argument("--mix", default="shifting")
    p.add_argument("--rounds", type=int, default=5)
    ns = p.parse_args()
    result = run(SynthConfig(days=ns.days, mean_rps=ns.mean_rps, mix=ns.mix), ns.rounds)
    low, high = min(result["requests"]), max(result["requests"])
    print(f"{low:,}-{high:,} requests a round; size tables read in {result['load_sizes_s'][0]:.2f} s")
    print(f"{'stage':<28} {'wall p50':>9} {'wall max':>9} {'cpu p50':>9}   ({ns.rounds} rounds)")
    for name, stage in result["stages"].items():
        wall, cpu = stage["wall"], stage["cpu"]
        print(f"{name:<28} {wall['p50']:>8.3f}s {wall['max']:>8.3f}s {cpu['p50']:>8.3f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "synth.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
