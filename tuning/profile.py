"""``token-scaler profile``: measure a live OpenAI-compatible model server under rising
concurrency (or a rising arrival rate) and say what one replica can take.

At each step ``concurrency`` clients send streaming requests back to back for
``--step-seconds`` (a closed loop: a slower server is sent fewer requests). With
``--rates`` each step instead sends requests at Poisson arrivals of that many per second
whatever the server does (an open loop, as users arrive), and its concurrency is the mean
number in flight it caused. Per step: served prompt and generated tokens/s, time to first token,
inter-token latency, and the wait before prefill (TTFT above the first step's). The answer is
the highest weighted tokens/s of a step that meets ``--ttft-p95`` and ``--itl-p95``: the
``tokensPerSecondPerReplica`` to paste into the ScaledObject. The file written with
``--json`` also holds a replica model fitted to the steps, which ``token-scaler simulate
--replica-profile`` reads:

* inter-token latency = ``step_base_s + step_per_seq_s x min(concurrency, max_concurrency)``
  (least squares over the steps);
* ``max_concurrency``: the concurrency after which tokens/s stops growing by 10 % a step;
* ``prefill_tokens_per_s``: prompt tokens / (TTFT - one step) at the lowest concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from token_scaler import config
from tuning import args as a
from tuning.errors import EndpointError
from tuning.loadgen import (
    Shape,
    Shot,
    Target,
    discover_kv_cache_tokens,
    discover_model,
    mean_in_flight,
    run_open_step,
    run_step,
)
from tuning.replica import PROFILE_KIND, PROFILE_VERSION, ReplicaProfile
from tuning.report import fmt, table
from tuning.trace import load_csv, load_sample, sample_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="token-scaler profile",
        description="Ramp concurrency against an OpenAI-compatible server; report tokens/s, TTFT and "
        "inter-token latency per step, the highest weighted tokens/s within the latency targets, and "
        "the ScaledObject metadata to paste.",
    )
    p.add_argument(
        "--url", required=True, type=a.arg(config.http_url), help="the server, e.g. http://127.0.0.1:8000"
    )
    p.add_argument("--model", help="model name (default: the first one GET /v1/models lists)")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--api", choices=("chat", "completions"), default="chat", help="endpoint (default chat)")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=a.listed(a.positive_int),
        default=[1, 2, 4, 8, 16, 32],
        help="closed-loop steps: clients sending back to back (default 1,2,4,8,16,32)",
    )
    load.add_argument(
        "--rates",
        type=a.listed(a.positive_float),
        help="open-loop steps instead: requests/s at Poisson arrivals, e.g. 0.5,1,2,4",
    )
    p.add_argument(
        "--step-seconds", type=a.positive_float, default=30.0, help="length of a step (default 30)"
    )
    p.add_argument(
        "--trace", type=Path, help=f"draw prompt/output sizes from this trace (default {sample_path().name})"
    )
    p.add_argument("--prompt-tokens", type=a.positive_int, help="fixed prompt size instead of a trace")
    p.add_argument("--output-tokens", type=a.positive_int, help="fixed output size instead of a trace")
    p.add_argument(
        "--max-prompt-tokens", type=a.positive_int, default=1024, help="clip trace prompts (default 1024)"
    )
    p.add_argument(
        "--max-output-tokens", type=a.positive_int, default=256, help="clip trace outputs (default 256)"
    )
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask the server to generate max_tokens (vLLM, llama.cpp, SGLang; default on)",
    )
    p.add_argument("--ttft-p95", type=a.positive_float, default=2.0, help="TTFT target, p95 in s (default 2)")
    p.add_argument(
        "--itl-p95",
        type=a.positive_float,
        default=0.15,
        help="inter-token latency target, p95 in s (default 0.15)",
    )
    p.add_argument(
        "--prompt-weight",
        type=a.non_negative_float,
        help="promptWeight (weighted tokens = promptWeight x prompt + "
        "generationWeight x generated tokens; default 1)",
    )
    p.add_argument(
        "--generation-weight",
        type=a.non_negative_float,
        help="generationWeight: what a generated token costs in prompt tokens (default: measured, the "
        "step time one more decoding sequence adds over a prompt token's prefill time)",
    )
    p.add_argument("--headroom", type=a.arg(_headroom), default=1.3, help="headroom to suggest (default 1.3)")
    p.add_argument(
        "--timeout", type=a.positive_float, default=120.0, help="per-request timeout, s (default 120)"
    )
    p.add_argument(
        "--seed", type=a.arg(a.non_negative_int), default=0, help="random prompts' seed (default 0)"
    )
    p.add_argument("--json", type=Path, help="write the profile here (simulate --replica-profile reads it)")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput and latency against concurrency")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _headroom(raw: str) -> float:
    value = config.positive_float(raw)
    if not 1 <= value <= 10:
        raise ValueError("expected a number from 1 to 10")
    return value


@dataclass
class Step:
    concurrency: int
    seconds: float
    requests: int
    errors: int
    prompt_tps: float
    generation_tps: float
    mean_prompt: float | None
    mean_output: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    itl_p50: float | None
    itl_p95: float | None
    e2e_p50: float | None
    wait_p50: float | None = None
    weighted_tps: float = 0.0
    meets: bool = False
    first_error: str | None = None
    offered_rps: float | None = None  # open loop: the arrival rate the step sent


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize_step(concurrency: int, shots: Sequence[Shot], seconds: float) -> Step:
    ok = [s for s in shots if s.ok]
    errors = [s for s in shots if s.error is not None]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    gaps = [g for s in ok for g in s.gaps()]
    prompt = sum(s.prompt_tokens or 0 for s in ok)
    output = sum(s.completion_tokens or 0 for s in ok)
    return Step(
        concurrency=concurrency,
        seconds=round(seconds, 3),
        requests=len(ok),
        errors=len(errors),
        prompt_tps=prompt / seconds if seconds > 0 else 0.0,
        generation_tps=output / seconds if seconds > 0 else 0.0,
        mean_prompt=prompt / len(ok) if ok else None,
        mean_output=output / len(ok) if ok else None,
        ttft_p50=_pct(ttft, 50),
        ttft_p95=_pct(ttft, 95),
        itl_p50=_pct(gaps, 50),
        itl_p95=_pct(gaps, 95),
        e2e_p50=_pct([s.end - s.sent for s in ok if s.end is not None], 50),
        first_error=errors[0].error if errors else None,
    )


def fit_replica(steps: Sequence[Step], shots_at_lowest: Sequence[Shot]) -> tuple[ReplicaProfile, str]:
    """A replica model for ``simulate`` from the measured steps; also says how sure it is."""
    usable = [s for s in steps if s.requests and s.itl_p50 is not None]
    if not usable:
        raise EndpointError("no step completed a request with two or more tokens: nothing to fit")
    notes = []
    # the knee: tokens/s stops growing by 10 % from one step to the next
    knee = usable[0].concurrency
    for before, after in itertools.pairwise(usable):
        if after.prompt_tps + after.generation_tps < 1.1 * (before.prompt_tps + before.generation_tps):
            break
        knee = after.concurrency
    else:
        notes.append(f"tokens/s still grew at concurrency {knee}: max_concurrency is a lower bound")
    x = np.array([min(s.concurrency, knee) for s in usable], dtype=float)
    y = np.array([s.itl_p50 for s in usable], dtype=float)
    if len(set(x.tolist())) >= 2:
        slope, intercept = np.polyfit(x, y, 1)
    else:
        slope, intercept = 0.0, float(y.mean())
        notes.append("one concurrency level below the knee: per-sequence step cost not measured (0)")
    slope = max(float(slope), 0.0)
    intercept = float(intercept) if intercept > 1e-4 else float(max(y.min() - slope * x.min(), 1e-3))
    rates = [
        s.prompt_tokens / max(s.ttft - intercept, 1e-3)
        for s in shots_at_lowest
        if s.ok and s.prompt_tokens and s.ttft is not None
    ]
    prefill = statistics.median(rates) if rates else 1000.0
    if not rates:
        notes.append("no prompt usage reported: prefill rate assumed 1000 tokens/s")
    profile = ReplicaProfile(
        step_base_s=round(intercept, 5),
        step_per_seq_s=round(slope, 6),
        prefill_tokens_per_s=round(prefill, 1),
        chunk_tokens=max(2048, 2 * knee),
        max_concurrency=knee,
        source="token-scaler profile",
    )
    return profile, "; ".join(notes)


def _table(steps: Sequence[Step]) -> str:
    open_loop = any(s.offered_rps is not None for s in steps)
    headers = [
        "offered req/s" if open_loop else "concurrency", "requests", "errors", "prompt tok/s",
        "gen tok/s", "weighted tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "wait p50", "meets",
    ]  # fmt: skip
    rows = [
        [
            f"{s.offered_rps:g} ({s.concurrency} in flight)"
            if s.offered_rps is not None
            else str(s.concurrency),
            str(s.requests),
            str(s.errors),
            f"{s.prompt_tps:.1f}",
            f"{s.generation_tps:.1f}",
            f"{s.weighted_tps:.1f}",
            fmt(s.ttft_p50, ".3f"),
            fmt(s.ttft_p95, ".3f"),
            fmt(s.itl_p50, ".4f"),
            fmt(s.itl_p95, ".4f"),
            fmt(s.wait_p50, ".3f"),
            "yes" if s.meets else "no",
        ]
        for s in steps
    ]
    return table(headers, rows)


class _Progress:
    def __init__(self, total_steps: int, step_seconds: float, enabled: bool) -> None:
        self.total = total_steps
        self.seconds = step_seconds
        self.enabled = enabled
        self.index = 0
        self.label = ""

    def start(self, index: int, label: str) -> None:
        self.index, self.label = index, label
        self(0.0, 0)

    def __call__(self, elapsed: float, done: int) -> None:
        if not self.enabled:
            return
        share = min(1.0, (self.index + min(elapsed / self.seconds, 1.0)) / self.total)
        bar = "#" * round(30 * share)
        tail = "draining" if elapsed > self.seconds else f"{elapsed:4.0f}/{self.seconds:g}s"
        print(
            f"\r[{bar:<30}] step {self.index + 1}/{self.total}  {self.label:<16} {tail}  {done} done ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def finish(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _shape(ns: argparse.Namespace) -> tuple[Shape, str]:
    if ns.prompt_tokens and ns.output_tokens:
        return Shape(
            [(ns.prompt_tokens, ns.output_tokens)]
        ), f"{ns.prompt_tokens} prompt / {ns.output_tokens} output"
    trace = load_csv(ns.trace) if ns.trace else load_sample()
    prompts = np.minimum(trace.prompt, ns.max_prompt_tokens)
    outputs = np.clip(trace.generated, 1, ns.max_output_tokens)
    if ns.prompt_tokens:
        prompts = np.full(len(trace), ns.prompt_tokens)
    if ns.output_tokens:
        outputs = np.full(len(trace), ns.output_tokens)
    pairs = [(max(1, int(p)), int(g)) for p, g in zip(prompts, outputs, strict=True)]
    where = f"{Path(trace.source).name}, prompts <= {ns.max_prompt_tokens}, outputs <= {ns.max_output_tokens}"
    if trace.attribution:
        where += f" ({trace.attribution})"
    return Shape(pairs), where


async def _measure(
    ns: argparse.Namespace, shape: Shape
) -> tuple[str, str, list[Step], list[Shot], tuple[int, str] | None]:
    base = ns.url if ns.url.endswith("/v1") else ns.url + "/v1"
    rng = random.Random(ns.seed)
    # One connection per request: a server that closes a kept-alive connection after a stream
    # while still advertising keep-alive (llama.cpp's) would fail the next request sent on it,
    # and those failures are the client's, not a measure of the server.
    open_loop = ns.rates is not None
    levels: list[float] = list(ns.rates) if open_loop else [float(c) for c in ns.concurrency]
    limit = 1000 if open_loop else int(max(levels)) + 4
    connector = aiohttp.TCPConnector(limit=limit, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        model = ns.model or await discover_model(session, base, ns.api_key)
        kv = await discover_kv_cache_tokens(session, base.removesuffix("/v1"))
        target = Target(base, model, ns.api, ns.api_key, ns.ignore_eos, ns.timeout)
        progress = _Progress(len(levels), ns.step_seconds, not ns.quiet)
        steps: list[Step] = []
        lowest: list[Shot] = []
        for index, level in enumerate(levels):
            label = f"{level:g} req/s" if open_loop else f"concurrency {level:g}"
            progress.start(index, label)
            if open_loop:
                shots, seconds = await run_open_step(
                    session, target, level, ns.step_seconds, shape, rng, progress
                )
                step = summarize_step(max(1, round(mean_in_flight(shots, seconds))), shots, seconds)
                step.offered_rps = level
            else:
                shots, seconds = await run_step(
                    session, target, int(level), ns.step_seconds, shape, rng, progress
                )
                step = summarize_step(int(level), shots, seconds)
            steps.append(step)
            if index == 0:
                lowest = shots
            if step.requests == 0:
                progress.finish()
                raise EndpointError(f"no request succeeded at {label}: {step.first_error or 'no answer'}")
        progress.finish()
    return base, model, steps, lowest, kv


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    shape, shape_note = _shape(ns)
    started = time.time()
    try:
        base, model, steps, lowest, kv = asyncio.run(_measure(ns, shape))
    except EndpointError as exc:
        print(f"token-scaler profile: {exc}", file=sys.stderr)
        return 1
    profile, notes = fit_replica(steps, lowest)
    if kv is not None:
        profile = replace(profile, kv_cache_tokens=kv[0])
        notes = "; ".join(n for n in (notes, f"KV cache {kv[0]} tokens ({kv[1]})") if n)
    pw, gw = profile.suggested_weights()
    if ns.prompt_weight is not None:
        pw = ns.prompt_weight
    if ns.generation_weight is not None:
        gw = ns.generation_weight
    best = _judge(steps, ns, pw, gw)
    recommendation: dict[str, Any] | None = None
    if best is not None:
        recommendation = _recommendation(best, pw, gw, ns.headroom)
        profile = replace(
            profile,
            tokens_per_second_per_replica=recommendation["tokensPerSecondPerReplica"],
            prompt_weight=pw,
            generation_weight=gw,
        )
    print(f"endpoint: {base} model {model} ({ns.api}); request sizes: {shape_note}")
    _report(ns, steps, profile, notes, best, pw, gw)
    document = {
        "kind": PROFILE_KIND,
        "version": PROFILE_VERSION,
        "url": base,
        "model": model,
        "api": ns.api,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "request_sizes": shape_note,
        "targets": {"ttft_p95_s": ns.ttft_p95, "itl_p95_s": ns.itl_p95},
        "recommendation": recommendation,
        "replica": {k: v for k, v in profile.to_json().items() if k in _PROFILE_KEYS},
        "fit_notes": notes,
        "steps": [asdict(s) for s in steps],
    }
    if ns.json:
        ns.json.write_text(json.dumps(document, indent=1))
        print(f"\nprofile: {ns.json} (token-scaler simulate --replica-profile {ns.json})")
    if ns.plot:
        from tuning import plots

        plots.profile(document, ns.plot)
        print(f"plot: {ns.plot}")
    return 0 if best is not None else 1


# The replica model's fields the profile document holds (what ``simulate --replica-profile`` reads).
_PROFILE_KEYS = (
    "step_base_s",
    "step_per_seq_s",
    "prefill_tokens_per_s",
    "chunk_tokens",
    "max_concurrency",
    "kv_cache_tokens",
)


def _judge(steps: Sequence[Step], ns: argparse.Namespace, pw: float, gw: float) -> Step | None:
    """Weigh each step's tokens/s, its wait before prefill and whether it meets the latency
    targets; the step of the highest weighted tokens/s among those that do."""
    base_ttft = steps[0].ttft_p50 or 0.0
    for s in steps:
        s.weighted_tps = pw * s.prompt_tps + gw * s.generation_tps
        s.wait_p50 = max(0.0, (s.ttft_p50 or 0.0) - base_ttft) if s.ttft_p50 is not None else None
        s.meets = (
            s.requests > 0
            and s.errors == 0
            and s.ttft_p95 is not None
            and s.ttft_p95 <= ns.ttft_p95
            and (s.itl_p95 is None or s.itl_p95 <= ns.itl_p95)
        )
    meeting = [s for s in steps if s.meets]
    return max(meeting, key=lambda s: s.weighted_tps) if meeting else None


def _recommendation(best: Step, pw: float, gw: float, headroom: float) -> dict[str, Any]:
    """The ScaledObject's settings the best step gives."""
    recommendation: dict[str, Any] = {
        "tokensPerSecondPerReplica": round(best.weighted_tps, 1),
        "promptWeight": round(pw, 3),
        "generationWeight": round(gw, 3),
        "headroom": headroom,
        "atConcurrency": best.concurrency,
    }
    if best.offered_rps is not None:
        recommendation["atRequestsPerSecond"] = best.offered_rps
    return recommendation


def _report(
    ns: argparse.Namespace,
    steps: Sequence[Step],
    p: ReplicaProfile,
    notes: str,
    best: Step | None,
    pw: float,
    gw: float,
) -> None:
    """The steps' table, the replica model fitted to them, and the trigger metadata to paste."""
    print(
        f"targets: TTFT p95 <= {ns.ttft_p95:g}s, inter-token latency p95 <= {ns.itl_p95:g}s; "
        f"weights {pw:g}/{gw:g}"
    )
    print()
    print(_table(steps))
    print()
    print(
        f"replica model: step {1000 * p.step_base_s:.2f} ms + {1000 * p.step_per_seq_s:.3f} ms/sequence, "
        f"{p.prefill_tokens_per_s:.0f} prompt tokens/s, {p.max_concurrency} concurrent sequences"
        + (f" ({notes})" if notes else "")
    )
    if best is None:
        print("\nno step met the latency targets: lower the concurrency steps or relax --ttft-p95/--itl-p95")
        return
    where = (
        f"{best.offered_rps:g} requests/s ({best.concurrency} in flight)"
        if best.offered_rps is not None
        else f"concurrency {best.concurrency}"
    )
    print(f"\nhighest weighted tokens/s within the targets: {best.weighted_tps:.1f} at {where}")
    print("\nScaledObject trigger metadata:")
    print("  triggers:")
    print("  - type: external-push")
    print("    metadata:")
    print("      scalerAddress: token-scaler.token-scaler.svc:9090")
    print(f'      tokensPerSecondPerReplica: "{best.weighted_tps:.0f}"')
    print(f'      promptWeight: "{pw:g}"')
    print(f'      generationWeight: "{gw:g}"')
    print(f'      headroom: "{ns.headroom:g}"')
