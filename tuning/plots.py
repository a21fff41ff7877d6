"""PNG plots (matplotlib, the optional ``tuning`` extra; imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tuning.engine import RunResult
from tuning.errors import TuningError
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


def simulation(results: Sequence[RunResult], path: str | Path, title: str, footnote: str = "") -> None:
    """Load, replicas and queue over time, and the TTFT CDF, one colour per policy."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), constrained_layout=True)
    load_ax, pods_ax, queue_ax, cdf_ax = axes
    first = results[0]
    t = first.timeline["t"] / 60
    load_ax.plot(t, _smooth(first.timeline["arrived_tokens"], 10), color="black", lw=0.8)
    load_ax.set_ylabel("tokens/s arriving\n(10 s mean)")
    load_ax.set_title(title)
    for result in results:
        tl = result.timeline
        minutes = tl["t"] / 60
        pods_ax.step(minutes, tl["pods"], where="post", lw=1.0, label=result.policy)
        queue_ax.plot(minutes, tl["queue"], lw=0.8, label=result.policy)
        r = result.requests
        done = r.status == DONE
        ttft = np.sort((r.first_token - r.arrival)[done])
        if len(ttft):
            # share of ALL requests served within x: rejected/dropped ones never reach 1.0
            share = np.arange(1, len(ttft) + 1) / len(r.arrival)
            cdf_ax.step(ttft, share, where="post", label=result.policy)
    pods_ax.set_ylabel("replicas (pods)")
    queue_ax.set_ylabel("requests queued")
    queue_ax.set_xlabel("minutes")
    cdf_ax.set_xscale("log")
    cdf_ax.set_xlabel("time to first token (s)")
    cdf_ax.set_ylabel("share of requests")
    for ax in (pods_ax, queue_ax, cdf_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    load_ax.grid(alpha=0.3)
    if footnote:
        fig.supxlabel(footnote, fontsize=7, color="dimgray")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pareto(
    points: Sequence[tuple[float, float, str]],
    front: Sequence[tuple[float, float, str]],
    others: dict[str, list[tuple[float, float]]],
    path: str | Path,
    title: str,
    footnote: str = "",
) -> None:
    """GPU-hours against SLO attainment: every sweep point, the front, the other policies' fronts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    ax.scatter(
        [p[0] for p in points], [p[1] for p in points], s=12, color="lightgray", label="token policy settings"
    )
    fx = [p[0] for p in front]
    fy = [p[1] for p in front]
    ax.plot(fx, fy, "o-", color="tab:blue", label="Pareto front")
    for x, y, label in front:
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    for name, pts in others.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", lw=0.8, label=f"{name} (front)")
    ax.set_xlabel("GPU-hours")
    ax.set_ylabel("SLO attainment (TTFT and end-to-end)")
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
