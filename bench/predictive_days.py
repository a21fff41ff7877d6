"""Reactive vs predictive token policy over synthesized days, against the foresight bound.

    python -m bench.predictive_days [--days 3] [--mean-rps 1.5] [--min-replicas 1]

Synthesizes the days (``tuning.synth``, seeded; near-empty nights: peak-to-trough 200, no
bursts), then replays them through the simulator for cold starts of 2 and 10 minutes: the
token policy reactive, the same with ``predictive: "true"`` (lead = cold start + 180 s), and
the foresight bound, all at one headroom. Prints attainment (TTFT 2 s, TPOT 100 ms), GPU-hours
and dropped requests per run, and writes them to ``bench/results/predictive-days.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tuning import simulate as cli
from tuning.registry import make
from tuning.simulate_options import build_parser
from tuning.synth import SynthConfig, generate
from tuning.synthesize import write_csv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.predictive_days", description=__doc__)
    p.add_argument("--days", type=float, default=3.0, help="days to synthesize (default 3)")
    p.add_argument("--mean-rps", type=float, default=1.5, help="mean requests/s (default 1.5)")
    p.add_argument("--min-replicas", type=int, default=1, help="minReplicaCount (0: scale to zero)")
    p.add_argument("--headroom", type=float, default=1.5, help="headroom of every run (default 1.5)")
    p.add_argument("--seed", type=int, default=6, help="seed of the synthesized days (default 6)")
    args = p.parse_args(argv)
    config = SynthConfig(
        days=args.days, mean_rps=args.mean_rps, peak_to_trough=200.0, bursts_per_day=0.0, seed=args.seed
    )
    synth = generate(config)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "days.csv"
        write_csv(synth, path)
        for cold in (120, 600):
            flags = [
                "--trace",
                str(path),
                "--cold-start",
                str(cold),
                "--min-replicas",
                str(args.min_replicas),
            ]
            if args.min_replicas == 0:
                flags += ["--initial-replicas", "0"]
            setup = cli.prepare(build_parser().parse_args([*flags, "--quiet"]))
            runs: tuple[tuple[str, str, dict[str, str]], ...] = (
                ("reactive", "token", {"activationTokensPerSecond": "100"}),
                ("predictive", "token", {"activationTokensPerSecond": "100", "predictive": "true",
                                         "leadSeconds": str(cold + 180)}),
                ("foresight", "foresight", {}),
            )  # fmt: skip
            for label, name, variant in runs:
                started = time.process_time()
                _, s = cli.run_one(setup, make(name, setup.cal, args.headroom, variant))
                key = f"cold start {cold}s, {label}"
                out[key] = {k: s[k] for k in ("gpu_hours", "slo_both", "dropped", "replicas_mean")}
                out[key]["cpu_s"] = round(time.process_time() - started, 1)
                print(f"{key:<32} {out[key]}", flush=True)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "predictive-days.json").write_text(
        json.dumps({"requests": len(synth.trace), "runs": out}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
