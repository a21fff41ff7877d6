"""Request traces: arrival time, prompt tokens and generated tokens per request.

The CSV format is Azure's LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``);
TIMESTAMP may be a date-time (``2023-11-16 18:17:03.9799600``) or seconds as a number.
Other column names are accepted when they say the same thing (``timestamp``,
``prompt_tokens``/``input_tokens``, ``completion_tokens``/``output_tokens``).

``speedup`` compresses time (x2 replays an hour in 30 minutes at twice the rate);
``scale`` multiplies the load: each request appears ``floor(scale)`` times, plus once more
with probability ``scale - floor(scale)``, each copy shifted by up to ``jitter_s`` either
way, so the load's shape over the hour is kept and bursts grow by the same factor.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tuning.errors import TraceError

AZURE_ATTRIBUTION = (
    'Azure LLM inference trace 2023 (code), CC-BY 4.0: Patel et al., "Splitwise: Efficient '
    'generative LLM inference using phase splitting", ISCA 2024'
)
SAMPLE_NAME = "azure-llm-inference-2023-code-sample.csv"

_TIME = ("timestamp", "time", "arrival", "arrival_time")
_PROMPT = ("contexttokens", "context_tokens", "prompt_tokens", "input_tokens", "prompt")
_GENERATED = ("generatedtokens", "generated_tokens", "completion_tokens", "output_tokens", "generated")


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; times in seconds from the first arrival."""

    arrival_s: npt.NDArray[np.float64]
    prompt: npt.NDArray[np.int64]
    generated: npt.NDArray[np.int64]
    source: str = ""
    attribution: str = ""

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def mean_tokens(self) -> tuple[float, float]:
        """Mean prompt and generated tokens per request."""
        if not len(self):
            return 0.0, 0.0
        return float(self.prompt.mean()), float(self.generated.mean())

    def transformed(
        self, *, speedup: float = 1.0, scale: float = 1.0, seed: int = 0, jitter_s: float = 1.0
    ) -> Trace:
        if speedup <= 0 or scale <= 0:
            raise TraceError("speedup and scale must be above 0")
        arrival = self.arrival_s / speedup
        prompt, generated = self.prompt, self.generated
        if scale != 1.0:
            rng = np.random.default_rng(seed)
            whole = math.floor(scale)
            copies = np.full(len(arrival), whole, dtype=np.int64)
            copies += rng.random(len(arrival)) < scale - whole
            index = np.repeat(np.arange(len(arrival)), copies)
            shift = rng.uniform(-jitter_s, jitter_s, len(index))
            # the first copy of each request keeps its own time, so x1.0 + 1 is a superset
            first = np.ones(len(index), dtype=bool)
            first[1:] = index[1:] != index[:-1]
            shift[first] = 0.0
            arrival = np.maximum(arrival[index] + shift, 0.0)
            prompt, generated = prompt[index], generated[index]
        order = np.argsort(arrival, kind="stable")
        arrival = arrival[order]
        start = arrival[0] if len(arrival) else 0.0
        return Trace(arrival - start, prompt[order], generated[order], self.source, self.attribution)

    def with_warm_up(self, seconds: float) -> Trace:
        """The trace's last ``seconds`` played first, then the whole trace from ``seconds`` on:
        a replay measured from ``seconds`` finds every policy where running through the
        trace's end (a day's evening before its midnight, an hour's last minutes before
        its first) left it, as a fleet that runs all along stands, not freshly started."""
        if seconds <= 0:
            return self
        seconds = min(seconds, self.duration_s)
        # the arrivals of [end - seconds, end), played in [0, seconds): all before the first
        # measured arrival, which comes at ``seconds``
        tail = (self.arrival_s >= self.duration_s - seconds) & (self.arrival_s < self.duration_s)
        arrival = np.concatenate(
            [self.arrival_s[tail] - (self.duration_s - seconds), self.arrival_s + seconds]
        )
        return Trace(
            arrival,
            np.concatenate([self.prompt[tail], self.prompt]),
            np.concatenate([self.generated[tail], self.generated]),
            self.source,
            self.attribution,
        )

    def head(self, seconds: float) -> Trace:
        keep = self.arrival_s <= seconds
        return Trace(
            self.arrival_s[keep], self.prompt[keep], self.generated[keep], self.source, self.attribution
        )


def _column(header: list[str], names: tuple[str, ...], what: str, path: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise TraceError(f"{path}: no {what} column (expected one of {', '.join(names)}; found {header})")


def _seconds(raw: str) -> float:
    raw = raw.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    # Azure writes 7 fractional digits; datetime takes at most 6.
    head, dot, frac = raw.partition(".")
    text = f"{head}.{frac[:6]}" if dot else head
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(text, fmt).timestamp()
        except ValueError:
            continue
    raise ValueError(f"not a time: {raw!r}")


def load_csv(path: str | Path, *, attribution: str | None = None) -> Trace:
    """Read a trace CSV. Raises ``TraceError`` naming the file, line and value on bad input."""
    name = str(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise TraceError(f"{name}: {exc.strerror or exc}") from exc
    if not rows:
        raise TraceError(f"{name}: empty file")
    header = rows[0]
    it, ip, ig = (
        _column(header, _TIME, "timestamp", name),
        _column(header, _PROMPT, "prompt tokens", name),
        _column(header, _GENERATED, "generated tokens", name),
    )
    times, prompts, generated = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            times.append(_seconds(row[it]))
            prompts.append(int(row[ip]))
            generated.append(int(row[ig]))
        except (ValueError, IndexError) as exc:
            raise TraceError(f"{name}:{line}: {exc}") from None
        if prompts[-1] < 0 or generated[-1] < 0:
            raise TraceError(f"{name}:{line}: token counts cannot be negative")
    if not times:
        raise TraceError(f"{name}: no requests")
    arrival = np.asarray(times, dtype=np.float64)
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - arrival[order[0]]
    if attribution is None:
        attribution = AZURE_ATTRIBUTION if "azure" in Path(name).name.lower() else _noted(Path(path))
    return Trace(
        arrival,
        np.asarray(prompts, dtype=np.int64)[order],
        np.asarray(generated, dtype=np.int64)[order],
        name,
        attribution,
    )


def _noted(path: Path) -> str:
    """The attribution line of the note ``token-scaler synthesize`` writes beside its CSV."""
    note = path.with_suffix(".md")
    try:
        lines = note.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        if line.startswith("Attribution: "):
            return line.removeprefix("Attribution: ").split(". Keep it")[0]
    return ""


def sample_path() -> Path:
    """The small trace shipped in the package (a slice of the Azure code trace)."""
    return Path(str(resources.files("token_scaler") / "data" / SAMPLE_NAME))


def load_sample() -> Trace:
    return load_csv(sample_path(), attribution=AZURE_ATTRIBUTION)
