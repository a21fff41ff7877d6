"""CPU of the scaler's window maths: ``WorkloadSeries.add`` per record, ``evaluate`` per call.

    python -m bench.window_bench [--sidecars 20 --models 2 --seconds 1500 --rounds 3]

A workload of ``--sidecars`` pods, each flushing one record a second (``--models`` models,
one tenant), for ``--seconds`` seconds; then ``evaluate`` at each of the last 300 seconds
with the default settings (burst envelope off) and with a 30 s burst envelope over 1,200 s.
The baseline, in the same run on the same records: the plain implementation the property
test compares against (``tests/scaler/window_reference.py``: lists only, arrays rebuilt at every
read). CPU (process) time, best of ``--rounds``. Results: printed and written to
bench/results/window.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench._common import save
from scaler.metadata import ScalerSettings
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from tests.scaler.window_reference import RefSeries, ref_evaluate
from token_scaler.record import ModelCounts, Record, TenantCounts

T0 = 1_700_000_000
EVALUATED_S = 300


def records(sidecars: int, models: int, seconds: int) -> list[tuple[Record, str]]:
    rng = random.Random(7)
    out = []
    for second in range(seconds):
        for pod in range(sidecars):
            per_model = {
                f"m{m}": ModelCounts(
                    rng.randint(0, 4000),
                    rng.randint(0, 4000),
                    rng.randint(0, 4000),
                    rng.randint(0, 4000),
                    rng.randint(0, 9),
                    3,
                    1,
                    40,
                    90,
                )
                for m in range(models)
            }
            tenants = {
                "t": {
                    name: TenantCounts(c.served_prompt, c.served_generation, 1)
                    for name, c in per_model.items()
                }
            }
            ts = (T0 + second) * 1000 + pod * 37 % 1000
            out.append((Record(f"pod-{pod}", second, ts, 1000, per_model, tenants), f"{ts}-0"))
    return out


def best_cpu(action: Callable[[], Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        action()
        best = min(best, time.process_time() - start)
    return best


def measure(args: argparse.Namespace) -> dict[str, Any]:
    stream = records(args.sidecars, args.models, args.seconds)
    end = T0 + args.seconds
    plain = ScalerSettings("ns/llm", 1000.0)
    burst = ScalerSettings("ns/llm", 1000.0, burst_window_s=30, burst_lookback_s=1200)
    result: dict[str, Any] = {"records": len(stream), "evaluations": EVALUATED_S}
    impls: dict[str, tuple[Callable[[], Any], Callable[..., Any]]] = {
        "window": (WorkloadSeries, evaluate),
        "reference": (RefSeries, ref_evaluate),
    }
    for name, (make, evaluate_with) in impls.items():

        def ingest(make: Callable[[], Any] = make) -> Any:
            series = make()
            for record, entry in stream:
                series.add(record, entry)
            return series

        series = ingest()

        def evaluations(
            settings: ScalerSettings, evaluate_with: Callable[..., Any] = evaluate_with, series: Any = series
        ) -> None:
            for s in range(end - EVALUATED_S, end):
                evaluate_with(series, settings, s * 1000 + 500)

        result[name] = {
            "us_per_add": best_cpu(ingest, args.rounds) / len(stream) * 1e6,
            "us_per_evaluate": best_cpu(lambda: evaluations(plain), args.rounds) / EVALUATED_S * 1e6,
            "us_per_evaluate_burst": best_cpu(lambda: evaluations(burst), args.rounds) / EVALUATED_S * 1e6,
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.window_bench")
    p.add_argument("--sidecars", type=int, default=20)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--seconds", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=3)
    result = measure(p.parse_args(argv))
    print(f"{'':12}{'us/add':>10}{'us/evaluate':>14}{'us/evaluate+burst':>20}")
    for name in ("window", "reference"):
        r = result[name]
        print(
            f"{name:12}{r['us_per_add']:10.2f}{r['us_per_evaluate']:14.1f}{r['us_per_evaluate_burst']:20.1f}"
        )
    print(json.dumps(result))
    print(f"written to {save('window', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
