"""Exact outcomes of short simulations, pinned: every policy, the routings, scale to zero, a
KV-cache limit and the token policy's floors. A change that makes the simulator faster must
leave each run's per-request times, replica timeline, HPA syncs and summary as they were,
to the last bit.

The literals in ``PINNED`` were produced by ``python -m tests.tuning.test_pinned_outcomes``
(which prints them) on the code of commit 98bd4dc. Each digest is the SHA-256 of the
arrays' bytes (``digest``): ``requests`` covers every request's first-token time, finish
time, status, generation estimate and decode start; ``timeline`` every column of the
once-a-second timeline; ``syncs`` every HPA sync's value, desired and current replicas.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tuning import simulate as cli
from tuning.engine import TIMELINE, RunResult
from tuning.policies import FixedPolicy, TokenPolicy
from tuning.registry import make, token_metadata, token_settings
from tuning.simulate_options import build_parser
from tuning.synth import SynthConfig, generate
from tuning.synthesize import write_csv

# Two hours at 3 requests/s on average with many bursts: enough for scale-ups, panics,
# scale-downs, drains, queue time-outs.
TRACE = SynthConfig(days=2 / 24, mean_rps=3.0, bursts_per_day=60.0, seed=11, mix="shifting")
SUMMARY_KEYS = ("gpu_hours", "slo_both", "ttft_p99", "e2e_p50", "dropped", "rejected", "scale_ups")


def digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def fingerprint(result: RunResult, summary: dict[str, Any]) -> dict[str, Any]:
    r = result.requests
    return {
        "requests": digest(r.first_token, r.finish, r.status, r.estimate, r.started),
        "timeline": digest(*(result.timeline[k] for k in TIMELINE)),
        "syncs": digest(*(result.syncs[k] for k in ("t", "value", "desired", "current"))),
        "pod_seconds": repr(result.pod_seconds),
        **{k: summary[k] for k in SUMMARY_KEYS},
    }


# a hundredth of the requests, and KEDA scales to zero after 30 s without any
ZERO = ["--scale", "0.01", "--min-replicas", "0", "--cooldown", "30"]
# case name -> (extra simulate flags, policy name, token variant)
CASES: dict[str, tuple[list[str], str, dict[str, str]]] = {
    "token": ([], "token", {}),
    "rps": ([], "rps", {}),
    "concurrency": ([], "concurrency", {}),
    "prometheus": ([], "prometheus", {}),
    "fixed": ([], "fixed", {}),
    "foresight": ([], "foresight", {}),
    "token-inflight-burst": ([], "token", {"inflight": "on", "burst": "30@0.95/1200"}),
    "token-round-robin": (["--routing", "round-robin"], "token", {}),
    "token-least-tokens": (["--routing", "least-tokens"], "token", {}),
    "token-predictive": ([], "token", {"predictive": "true"}),
    "token-zero": (ZERO, "token", {}),
    "rps-zero": (ZERO, "rps", {}),
    "concurrency-kv-cached": (["--kv-cache-tokens", "40000", "--use-cached-metrics"], "concurrency", {}),
}


def run_case(path: Path, name: str) -> dict[str, Any]:
    flags, policy_name, variant = CASES[name]
    setup = cli.prepare(build_parser().parse_args(["--trace", str(path), "--quiet", *flags]))
    if policy_name == "fixed":
        n = 4
        result, summary = cli.run_one(setup, FixedPolicy(n), cli.fixed_config(setup.config, n))
    elif variant:
        policy = TokenPolicy(token_settings(token_metadata(setup.cal, None, variant)))
        result, summary = cli.run_one(setup, policy)
    else:
        result, summary = cli.run_one(setup, make(policy_name, setup.cal))
    return fingerprint(result, summary)


PINNED: dict[str, dict[str, Any]] = {
    "token": {
        "requests": "ddd420c3bb026177",
        "timeline": "c35ae2201cfb1312",
        "syncs": "afcb4b4955ceaa67",
        "pod_seconds": "22016.022729322674",
        "gpu_hours": 6.116,
        "slo_both": 0.7904,
        "ttft_p99": 60.296,
        "e2e_p50": 6.085,
        "dropped": 320,
        "rejected": 0,
        "scale_ups": 8,
    },
    "rps": {
        "requests": "bb171739e5ccf83d",
        "timeline": "9f35b098425c83c2",
        "syncs": "b713bf0e39a2a06d",
        "pod_seconds": "20864.81212528056",
        "gpu_hours": 5.796,
        "slo_both": 0.7834,
        "ttft_p99": 60.176,
        "e2e_p50": 6.141,
        "dropped": 530,
        "rejected": 0,
        "scale_ups": 11,
    },
    "concurrency": {
        "requests": "706359fbeafd0dd0",
        "timeline": "0747e0e567bcb9a5",
        "syncs": "ae07053c37c77046",
        "pod_seconds": "35617.03992116487",
        "gpu_hours": 9.894,
        "slo_both": 0.7588,
        "ttft_p99": 54.907,
        "e2e_p50": 6.799,
        "dropped": 153,
        "rejected": 0,
        "scale_ups": 28,
    },
    "prometheus": {
        "requests": "067d33e246d8091c",
        "timeline": "f9b8866c36a1f47b",
        "syncs": "c30b30ea36b1b388",
        "pod_seconds": "18380.978109357304",
        "gpu_hours": 5.106,
        "slo_both": 0.7743,
        "ttft_p99": 60.331,
        "e2e_p50": 6.295,
        "dropped": 745,
        "rejected": 0,
        "scale_ups": 8,
    },
    "fixed": {
        "requests": "2537ca4fe5d4fd40",
        "timeline": "2a7d32d8c2c10931",
        "syncs": "cc3d7f44ebd2c709",
        "pod_seconds": "29280.0",
        "gpu_hours": 8.133,
        "slo_both": 0.9182,
        "ttft_p99": 57.944,
        "e2e_p50": 4.165,
        "dropped": 146,
        "rejected": 0,
        "scale_ups": 0,
    },
    "foresight": {
        "requests": "42944f70def2c323",
        "timeline": "c2a7fbeceea5a4e1",
        "syncs": "cd3eb20dcc2af356",
        "pod_seconds": "24959.29831561309",
        "gpu_hours": 6.933,
        "slo_both": 0.9843,
        "ttft_p99": 1.526,
        "e2e_p50": 4.393,
        "dropped": 0,
        "rejected": 0,
        "scale_ups": 11,
    },
    "token-inflight-burst": {
        "requests": "8c6c6a62d086b3b3",
        "timeline": "a69d14f096bf861c",
        "syncs": "2dc36e8aac15e01d",
        "pod_seconds": "35975.3249190798",
        "gpu_hours": 9.993,
        "slo_both": 0.8544,
        "ttft_p99": 41.639,
        "e2e_p50": 4.942,
        "dropped": 0,
        "rejected": 0,
        "scale_ups": 20,
    },
    "token-round-robin": {
        "requests": "23fd815521110f5e",
        "timeline": "2289b4cc3c003a02",
        "syncs": "2d3288994d9ba64c",
        "pod_seconds": "22604.117965204718",
        "gpu_hours": 6.279,
        "slo_both": 0.7967,
        "ttft_p99": 60.283,
        "e2e_p50": 5.953,
        "dropped": 394,
        "rejected": 0,
        "scale_ups": 7,
    },
    "token-least-tokens": {
        "requests": "5b9517d3ed76224d",
        "timeline": "206275713f751949",
        "syncs": "fe247f75047e80da",
        "pod_seconds": "22744.050750142796",
        "gpu_hours": 6.318,
        "slo_both": 0.8039,
        "ttft_p99": 60.269,
        "e2e_p50": 5.861,
        "dropped": 327,
        "rejected": 0,
        "scale_ups": 7,
    },
    "token-predictive": {
        "requests": "ddd420c3bb026177",
        "timeline": "c35ae2201cfb1312",
        "syncs": "afcb4b4955ceaa67",
        "pod_seconds": "22016.022729322674",
        "gpu_hours": 6.116,
        "slo_both": 0.7904,
        "ttft_p99": 60.296,
        "e2e_p50": 6.085,
        "dropped": 320,
        "rejected": 0,
        "scale_ups": 8,
    },
    "token-zero": {
        "requests": "bc0e574b35922b91",
        "timeline": "57fef4ff680e5fb5",
        "syncs": "6b97d4fafd7f3063",
        "pod_seconds": "4295.409608343893",
        "gpu_hours": 1.193,
        "slo_both": 0.1571,
        "ttft_p99": 60.285,
        "e2e_p50": 5.546,
        "dropped": 153,
        "rejected": 0,
        "scale_ups": 42,
    },
    "rps-zero": {
        "requests": "1b7cbf1282e4bbd0",
        "timeline": "755ee9f593931aef",
        "syncs": "3220b62d9f835151",
        "pod_seconds": "5670.0",
        "gpu_hours": 1.575,
        "slo_both": 0.4857,
        "ttft_p99": 56.867,
        "e2e_p50": 3.869,
        "dropped": 78,
        "rejected": 0,
        "scale_ups": 27,
    },
    "concurrency-kv-cached": {
        "requests": "8bdaf270ce34046e",
        "timeline": "2df9c7aee9d2bbe5",
        "syncs": "f1bc394bc485019c",
        "pod_seconds": "46255.54886584138",
        "gpu_hours": 12.849,
        "slo_both": 0.6615,
        "ttft_p99": 60.564,
        "e2e_p50": 8.23,
        "dropped": 1082,
        "rejected": 0,
        "scale_ups": 41,
    },
}


@pytest.fixture(scope="module")
def trace_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pinned") / "trace.csv"
    write_csv(generate(TRACE), path)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_outcomes_are_the_pinned_ones(trace_csv: Path, name: str) -> None:
    assert run_case(trace_csv, name) == PINNED[name]


def _all(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in CASES:
        yield name, run_case(path, name)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "trace.csv"
        write_csv(generate(TRACE), csv)
        out = {name: fp for name, fp in _all(csv)}
    json.dump(out, sys.stdout, indent=4)
    print()
