"""``simulate --sweep``: every policy given the same search, and the foresight bound; what
the search (``tuning.search``) looks for, and how its runs are read.

For each policy, each of its variants (the token policy's window and panic settings, the
request-rate and Prometheus rate windows) and each scale-down stabilization window, the
search looks for the smallest headroom whose run reaches each attainment level, by
bisection on log(headroom) to 2 % over one range for every policy (``--sweep-headroom-range``,
its top doubled up to 16x for a policy that does not reach a level there while its fleet
still grows):
GPU-hours grow with headroom, so the smallest headroom reaching a level is the cheapest
setting of that family that does. A fixed deployment is searched the same way over its
replica count (every count from 1 to maxReplicas is a candidate, not a sampled few).

The table and the verdict compare ``Best.fitted``: GPU-hours at each level read off a
monotone fit of each family's runs, so that no policy wins by a lucky run; the setting
shown (and recommended) is the cheapest run that reached the level.

Every run an autoscaler makes starts from the same warm start (``SimConfig``'s initial
replicas), and every policy is calibrated from one measurement (``tuning.registry``). A
level reached only at an edge of the range is flagged: the range, not the policy, may be
what limits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuning.report import fmt, table


@dataclass(frozen=True)
class Run:
    policy: str
    settings: dict[str, str]
    gpu_hours: float
    attainment: float
    summary: dict[str, Any]


@dataclass
class Best:
    """The runs of one policy."""

    runs: list[Run] = field(default_factory=list)

    def cheapest(self, level: float) -> Run | None:
        meeting = [r for r in self.runs if r.attainment >= level]
        return min(meeting, key=lambda r: r.gpu_hours) if meeting else None

    def fitted(self, level: float) -> float | None:
        """The fewest GPU-hours reaching ``level`` read off a fit, not off the luckiest run.

        Attainment is noisy in headroom (which requests meet a cold start shifts with every
        setting), so the cheapest run at or above a level is often one that got there by
        luck, and a policy searched over more variants draws more such runs. Per family of
        runs (the same settings but headroom), attainment and GPU-hours are each made
        non-decreasing in headroom (pool-adjacent-violators, the least-squares monotone
        fit), and the GPU-hours are interpolated where the fitted attainment crosses the
        level; the policy's figure is its cheapest family's. A replica count cannot be
        interpolated: without a headroom (fixed) it is ``cheapest``'s."""
        found = self.fitted_family(level)
        return None if found is None else found[0]

    def fitted_family(self, level: float) -> tuple[float, dict[str, str]] | None:
        """``fitted``'s figure and the settings (all but headroom) of the family it is read
        off; a fixed deployment's cheapest run and its settings."""
        families: dict[tuple[tuple[str, str], ...], list[Run]] = {}
        for r in self.runs:
            if "headroom" not in r.settings:
                run = self.cheapest(level)
                return None if run is None else (run.gpu_hours, run.settings)
            key = tuple(sorted((k, v) for k, v in r.settings.items() if k != "headroom"))
            families.setdefault(key, []).append(r)
        found = [
            (g, dict(key)) for key, runs in families.items() if (g := _crossing(runs, level)) is not None
        ]
        return min(found, key=lambda f: f[0]) if found else None


def _monotone(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent
    violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out += [total / count] * int(count)
    return out


def _crossing(runs: list[Run], level: float) -> float | None:
    """GPU-hours where one family's fitted attainment reaches ``level`` (None: it does not)."""
    ordered = sorted(runs, key=lambda r: float(r.settings["headroom"]))
    reached = _monotone([r.attainment for r in ordered])
    gpu = _monotone([r.gpu_hours for r in ordered])
    for i, a in enumerate(reached):
        if a >= level:
            if i == 0:
                return gpu[0]
            below = reached[i - 1]
            return gpu[i - 1] + (level - below) / (a - below) * (gpu[i] - gpu[i - 1])
    return None


def _label(run: Run | None) -> str:
    if run is None:
        return "-"
    return " ".join(f"{k}={v}" for k, v in run.settings.items())


def _held_by_edge(run: Run | None, low: float) -> bool:
    """No run reached the level (so not even the range's top did), or the cheapest one
    is at the range's low end, where a lower headroom might reach it cheaper."""
    if run is None:
        return True
    return "headroom" in run.settings and float(run.settings["headroom"]) <= low


def comparison_table(results: dict[str, Best], levels: Sequence[float], goal: float, low: float) -> str:
    headers = ["policy"] + [f"GPU-h for {100 * lv:g}%" for lv in levels] + [f"setting at {100 * goal:g}%"]
    rows = []
    for name, best in results.items():
        cells = []
        for level in levels:
            fit = best.fitted(level)
            mark = "*" if _held_by_edge(best.cheapest(level), low) else ""
            cells.append(fmt(fit, ".2f") + mark if fit is not None else "-" + mark)
        goal_run = best.cheapest(goal)
        setting = _label(goal_run)
        if goal_run is not None:
            setting += f" (run: {goal_run.gpu_hours:.2f} GPU-h, {100 * goal_run.attainment:.1f}%)"
        rows.append([name, *cells, setting])
    return table(headers, rows)


def verdict(results: dict[str, Best], level: float, runnable: Sequence[str], bound: str) -> list[str]:
    """Who wins at ``level``, by how much, in words: fixed, the autoscalers, the bound."""
    lines = []
    found = {name: best.fitted_family(level) for name, best in results.items()}
    reached = {n: f[0] for n, f in found.items() if f is not None}
    autoscalers = {n: reached[n] for n in runnable if n in reached}
    pct = f"{100 * level:g} %"
    if not autoscalers:
        return [f"at {pct}: no autoscaling policy reached it in the searched range"]
    winner = min(autoscalers, key=lambda n: autoscalers[n])
    lines.append(f"at {pct}: the cheapest autoscaler is {winner} ({autoscalers[winner]:.2f} GPU-h)")
    fixed = reached.get("fixed")
    if fixed is None:
        lines.append("  no fixed replica count up to maxReplicas reached it")
    elif fixed <= autoscalers[winner]:
        lines.append(
            f"  a FIXED deployment beats every autoscaler: {fixed:.2f} GPU-h "
            f"({_rel(autoscalers[winner], fixed)} for {winner})"
        )
    else:
        lines.append(
            f"  autoscaling beats fixed ({fixed:.2f} GPU-h) by {_saving(autoscalers[winner], fixed)}"
        )
    lines += _longest_hold_note(results, winner, found[winner])
    token = autoscalers.get("token")
    if token is not None:
        for other in runnable:
            if other != "token" and other in autoscalers:
                lines.append(f"  token vs {other}: {_rel(token, autoscalers[other])}")
    if bound in reached:
        b = reached[bound]
        distances = ", ".join(f"{n} {_rel(c, b)}" for n, c in autoscalers.items())
        lines.append(f"  distance to the foresight bound ({b:.2f} GPU-h): {distances}")
    return lines


def _longest_hold_note(
    results: dict[str, Best], winner: str, found: tuple[float, dict[str, str]] | None
) -> list[str]:
    """A note when the cheapest autoscaler's fitted family holds its pods for the longest
    scale-down window searched, of two or more: on bursts shorter than a cold start the
    cheapest policy is the one that keeps the pods of the last burst, and a longer window
    may keep them for less. ``found``: the winner's ``fitted_family``."""
    searched = {
        float(r.settings["scaleDownWindow"])
        for b in results.values()
        for r in b.runs
        if "scaleDownWindow" in r.settings
    }
    if len(searched) < 2 or found is None or "scaleDownWindow" not in found[1]:
        return []
    window = float(found[1]["scaleDownWindow"])
    if window < max(searched):
        return []
    return [
        f"  {winner}'s cheapest family holds its pods for the longest scale-down window searched "
        f"({window:g} s): a longer one (--sweep-scale-down-windows) may do better"
    ]


def _rel(value: float, reference: float) -> str:
    """``value`` against ``reference``: '+12.0 %' costs more, '-5.0 %' less."""
    return f"{100 * (value / reference - 1):+.1f} %"


def _saving(value: float, reference: float) -> str:
    return f"{100 * (1 - value / reference):.1f} %"


def to_json(results: dict[str, Best], levels: Sequence[float]) -> list[dict[str, Any]]:
    out = []
    for name, best in results.items():
        cheapest: dict[str, Any] = {}
        fitted: dict[str, float | None] = {}
        families: dict[str, dict[str, str] | None] = {}
        for level in levels:
            run = best.cheapest(level)
            cheapest[f"{level:g}"] = (
                None
                if run is None
                else {"gpu_hours": run.gpu_hours, "attainment": run.attainment, "settings": run.settings}
            )
            found = best.fitted_family(level)
            fitted[f"{level:g}"] = None if found is None else round(found[0], 3)
            families[f"{level:g}"] = None if found is None else found[1]
        out.append(
            {
                "policy": name,
                "runs": len(best.runs),
                "fitted": fitted,
                "fitted_family": families,
                "cheapest": cheapest,
                "points": [
                    {"settings": r.settings, "gpu_hours": r.gpu_hours, "slo": r.attainment} for r in best.runs
                ],
            }
        )
    return out
