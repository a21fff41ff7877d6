"""PNG plots (matplotlib, the optional ``tuning`` extra; imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tuning.engine import RunResult
from tuning.errors import TuningError
from tuning.metrics import Slo
from tuning.replica import DONE


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise TuningError("plots need matplotlib: pip install 'token-scaler[tuning]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: np.ndarray[Any, Any], seconds: int) -> np.ndarray[Any, Any]:
    if len(values) < seconds:
        return values
    kernel = np.ones(seconds) / seconds
    return np.convolve(values, kernel, mode="same")


def _cdf(ax: Any, values: np.ndarray[Any, Any], total: int, label: str) -> None:
    """Share of ALL requests within x: rejected and dropped ones keep the curve below 1."""
    values = np.sort(values)
    if len(values):
        ax.step(values, np.arange(1, len(values) + 1) / total, where="post", label=label)


def simulation(
    results: Sequence[RunResult],
    path: str | Path,
    title: str,
    footnote: str = "",
    capacity: float | None = None,
    slo: Slo | None = None,
) -> None:
    """Per policy (one colour each): demand against the capacity of its ready pods, ready
    and starting pods, queues, and the TTFT and end-to-end CDFs with the SLO marked.
    ``capacity`` is one replica's in the timeline's weighted tokens/s."""
    plt = _pyplot()
    fig, axes = plt.subplots(5, 1, figsize=(11, 16), constrained_layout=True)
    load_ax, pods_ax, queue_ax, ttft_ax, e2e_ax = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first = results[0]
    t = first.timeline["t"] / 60
    load_ax.plot(t, _smooth(first.timeline["arrived_weighted"], 30), color="black", lw=0.9, label="demand")
    load_ax.set_ylabel("weighted tokens/s arriving\n(30 s mean)")
    load_ax.set_title(title)
    for k, result in enumerate(results):
        color = colors[k % len(colors)]
        tl = result.timeline
        minutes = tl["t"] / 60
        if capacity is not None:
            load_ax.step(minutes, tl["ready"] * capacity, where="post", lw=0.8, color=color,
                         label=f"{result.policy}: capacity of ready pods")  # fmt: skip
        pods_ax.step(minutes, tl["pods"], where="post", lw=0.8, ls="--", color=color)
        pods_ax.step(minutes, tl["ready"], where="post", lw=1.1, color=color, label=result.policy)
        queue_ax.plot(minutes, tl["queue"], lw=0.8, color=color, label=result.policy)
        r = result.requests
        done = r.status == DONE
        _cdf(ttft_ax, (r.first_token - r.arrival)[done], len(r.arrival), result.policy)
        _cdf(e2e_ax, (r.finish - r.arrival)[done], len(r.arrival), result.policy)
    pods_ax.set_ylabel("pods: ready (solid),\nready + starting (dashed)")
    queue_ax.set_ylabel("requests queued")
    queue_ax.set_xlabel("minutes")
    ttft_ax.set_xlabel("time to first token (s)")
    e2e_ax.set_xlabel("end to end (s)")
    if slo is not None:
        ttft_ax.axvline(slo.ttft_s, color="red", lw=0.8, ls=":", label=f"SLO {slo.ttft_s:g}s")
        if slo.e2e_s is not None:
            e2e_ax.axvline(slo.e2e_s, color="red", lw=0.8, ls=":", label=f"SLO {slo.e2e_s:g}s")
    for ax in (ttft_ax, e2e_ax):
        ax.set_xscale("log")
        ax.set_ylabel("share of requests")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    if footnote:
        fig.supxlabel(footnote, fontsize=7, color="dimgray")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto(
    runs: dict[str, list[tuple[float, float]]], path: str | Path, title: str, footnote: str = ""
) -> None:
    """GPU-hours against SLO attainment: each policy's runs (dots) and its Pareto front (line).
    The legend names the policies; no point carries a label of its own, so none overprint."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    for name, points in runs.items():
        if not points:
            continue
        ordered = sorted(points)
        front, best = [], -1.0
        for x, y in ordered:
            if y > best:
                front.append((x, y))
                best = y
        dots = ax.scatter([p[0] for p in points], [p[1] for p in points], s=8, alpha=0.35)
        color = tuple(dots.get_facecolor()[0][:3])  # the dots' colour, without their transparency
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", lw=1.4, color=color,
                label=f"{name} ({len(points)} runs)")  # fmt: skip
    ax.set_xlabel("GPU-hours")
    ax.set_ylabel("share of requests within every SLO")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if footnote:
        fig.supxlabel(footnote, fontsize=7, color="dimgray")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profile(document: dict[str, Any], path: str | Path) -> None:
    """Throughput and latency against concurrency, with the targets."""
    plt = _pyplot()
    steps = document["steps"]
    c = [s["concurrency"] for s in steps]
    fig, (tps_ax, lat_ax) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, constrained_layout=True)
    tps_ax.plot(c, [s["prompt_tps"] for s in steps], "o-", label="prompt tokens/s")
    tps_ax.plot(c, [s["generation_tps"] for s in steps], "o-", label="generated tokens/s")
    tps_ax.plot(c, [s["weighted_tps"] for s in steps], "o-", label="weighted tokens/s")
    rec = document.get("recommendation")
    if rec:
        tps_ax.axhline(rec["tokensPerSecondPerReplica"], color="gray", ls="--", lw=0.8, label="recommended")
    tps_ax.set_ylabel("tokens/s")
    tps_ax.set_title(f"{document['model']} at {document['url']}")

    def series(key: str) -> list[float]:
        return [float("nan") if s[key] is None else s[key] for s in steps]

    lat_ax.plot(c, series("ttft_p50"), "o-", label="TTFT p50")
    lat_ax.plot(c, series("ttft_p95"), "o-", label="TTFT p95")
    lat_ax.plot(c, series("itl_p95"), "o-", label="inter-token p95")
    targets = document["targets"]
    lat_ax.axhline(targets["ttft_p95_s"], color="tab:orange", ls="--", lw=0.8, label="TTFT target")
    lat_ax.axhline(targets["itl_p95_s"], color="tab:green", ls="--", lw=0.8, label="ITL target")
    lat_ax.set_yscale("log")
    lat_ax.set_ylabel("seconds")
    lat_ax.set_xlabel("concurrent requests")
    lat_ax.set_xscale("log", base=2)
    for ax in (tps_ax, lat_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sizes = document.get("request_sizes", "")
    if sizes:
        fig.supxlabel(f"request sizes: {sizes}", fontsize=7, color="dimgray")
    fig.savefig(path, dpi=100)
    plt.close(fig)
