"""Synthesized traffic with days and weeks in it: arrivals from a daily + weekly envelope with
bursts, request sizes bootstrapped from the shipped Azure traces.

**Arrivals** are a non-homogeneous Poisson process. Its rate, in requests per second, is

    rate(t) = c * weekly(t) * diurnal(hour(t)) * bursts(t)

with ``c`` chosen so that the mean over the whole span (bursts included) is ``mean_rps``, so a
trace of ``days`` days holds ``mean_rps * days * 86400`` requests on average. Time 0 is
midnight at the start of ``start_day``; hours are the service's local time.

- ``diurnal(h) = 1 + (peak_to_trough - 1) * g(h)**2`` with
  ``g(h) = (1 + cos(2 pi (h - peak_hour) / 24)) / 2``: the highest rate at ``peak_hour``
  (default 14:00), the lowest twelve hours away (02:00), exactly ``peak_to_trough`` times
  apart; squaring ``g`` makes the high part a business-hours hump (at 09:00 and 19:00 the rate
  is 40 % of the way from trough to peak) and the night (22:00-06:00) flat near the trough.
- ``weekly``: 1 on weekdays, ``weekend_factor`` (default 0.5) on Saturday and Sunday, changing
  linearly between 22:00 and 02:00 around each midnight.
- ``bursts``: burst starts are a Poisson process of ``bursts_per_day``; each multiplies the
  rate by a factor drawn uniformly from ``burst_multiplier`` for a time drawn uniformly from
  ``burst_seconds``. Where bursts overlap their factors multiply (``burst_overlap`` "multiply",
  the default: three bursts of x5 make x125) or their excesses add ("add": x5 and x5 make x9,
  as independent surges of clients would).

Where the shape comes from. The Azure LLM inference traces 2024 (one week each of a coding and a
conversation service, May 2024, described in Stojkovic et al., "DynamoLLM: Designing LLM
Inference Clusters for Performance and Energy Efficiency", HPCA 2025; their per-minute
invocation plots are in AzurePublicDataset's ``analysis/AzureLLMInferenceDataset2024.ipynb``)
show a daily cycle, high in the daytime and low at night, and quieter weekends. Read by eye from
those plots: the coding week's weekday peaks are about ten times its night troughs and its
weekend days peak at a quarter or less of the weekday peaks; the conversation week swings about
two to two-and-a-half times a day and its weekend days run at roughly half to two thirds of its
weekdays. The default ``peak_to_trough`` of 4 and ``weekend_factor`` of 0.5 sit between the two.
BurstGPT (Wang et al., arXiv 2401.17644: months of GPT-3.5 and GPT-4 requests served through
Azure) documents bursty arrivals in production LLM serving; the bursts here stand in for those.
Assumed, not measured: the cosine-squared form, the peak at 14:00 local time, a weekend that is
the weekday curve scaled down, square bursts, their frequency (4 a day), size (x2-x4) and length
(30-300 s).

**Request sizes** are drawn with replacement (prompt and generated tokens together, as pairs)
from the Azure LLM inference trace 2023 (Patel et al., "Splitwise", ISCA 2024; CC-BY 4.0),
shipped in ``token_scaler/data``: the hour of the code-completion service (8,819 requests,
median 1,469 prompt and 13 generated tokens) for the ``code`` service, the hour of the
conversation service (19,366 requests, median 1,020 and 129) for ``conversation``.

**The mix** says which service a request belongs to. ``steady``: a request is ``code`` with
probability ``code_share`` at every hour. ``shifting``: that probability is
``code_share + mix_swing * cos(2 pi (h - peak_hour + 2) / 24)`` (clipped to 0..1), highest two
hours before the rate's peak (12:00 by default) and lowest twelve hours later, so code
completion dominates business hours and conversation the evening and night, and the weighted
tokens per request swing over the day (``summarize`` reports by how much). With the defaults
the conversation service's own rate then has a single peak at 18:00, about 2.6 times its
trough, and the code service's a single peak at 13:15, about 20 times its trough (the Azure 2024
coding week: about ten). Assumed: the phase and the swing; the Azure 2024 conversation week
swings about as much but peaks in the daytime (UTC), like the coding week.

The three random parts (bursts, arrival times, sizes and services) draw from separate streams of
``seed``: two mixes with the same seed have the same arrival times.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from token_scaler.errors import ConfigError
from tuning.errors import TraceError
from tuning.trace import Trace

DAY_S = 86400.0
HOUR_S = 3600.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MIXES = ("steady", "shifting")
OVERLAPS = ("multiply", "add")  # how overlapping bursts combine
SERVICES = ("code", "conversation")
SERVICE_FILES = {
    "code": "azure-llm-inference-2023-code.csv",
    "conversation": "azure-llm-inference-2023-conv.csv",
}
SIZES_ATTRIBUTION = (
    "request sizes from the Azure LLM inference trace 2023 ({services}), CC-BY 4.0: Patel et al., "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
)
# hours by which the code share's daily high comes before the rate's peak
SHARE_LEAD_H = 2.0
MAX_DAYS = 60.0
MAX_EXPECTED_REQUESTS = 50_000_000


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides a synthesized trace; the module docstring explains each part."""

    days: float = 7.0
    mean_rps: float = 2.0
    peak_to_trough: float = 4.0
    peak_hour: float = 14.0
    weekend_factor: float = 0.5
    start_day: str = "mon"
    bursts_per_day: float = 4.0
    burst_multiplier: tuple[float, float] = (2.0, 4.0)
    burst_seconds: tuple[float, float] = (30.0, 300.0)
    burst_overlap: str = "multiply"
    mix: str = "steady"
    code_share: float = 0.5
    mix_swing: float = 0.35
    seed: int = 0
    step_s: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {allowed}")

        if not 0 < self.days <= MAX_DAYS:
            raise bad("days", f"expected a number of days above 0 and at most {MAX_DAYS:g}")
        if not 0 < self.mean_rps < math.inf:
            raise bad("mean_rps", "expected a finite rate above 0")
        if self.mean_rps * self.days * DAY_S > MAX_EXPECTED_REQUESTS:
            raise bad("mean_rps", f"with days={self.days:g}: more than {MAX_EXPECTED_REQUESTS:,} requests")
        if not 1 <= self.peak_to_trough < math.inf:
            raise bad("peak_to_trough", "expected a finite ratio of 1 or more")
        if not 0 <= self.peak_hour < 24:
            raise bad("peak_hour", "expected an hour from 0 to 24 (exclusive)")
        if not 0 < self.weekend_factor < math.inf:
            raise bad("weekend_factor", "expected a finite factor above 0")
        if self.start_day not in WEEKDAYS:
            raise bad("start_day", f"expected one of {', '.join(WEEKDAYS)}")
        if not 0 <= self.bursts_per_day < math.inf:
            raise bad("bursts_per_day", "expected a finite number of 0 or more")
        low, high = self.burst_multiplier
        if not 1 <= low <= high < math.inf:
            raise bad("burst_multiplier", "expected LOW,HIGH with 1 <= LOW <= HIGH")
        low, high = self.burst_seconds
        if not 0 < low <= high <= DAY_S:
            raise bad("burst_seconds", "expected LOW,HIGH seconds with 0 < LOW <= HIGH <= 86400")
        if self.burst_overlap not in OVERLAPS:
            raise bad("burst_overlap", f"expected one of {', '.join(OVERLAPS)}")
        if self.mix not in MIXES:
            raise bad("mix", f"expected one of {', '.join(MIXES)}")
        if not 0 <= self.code_share <= 1:
            raise bad("code_share", "expected a fraction from 0 to 1")
        if not 0 <= self.mix_swing <= 1:
            raise bad("mix_swing", "expected a fraction from 0 to 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "expected a whole number of 0 or more")
        if not 0 < self.step_s <= 60:
            raise bad("step_s", "expected a rate grid step above 0 and at most 60 seconds")

    @property
    def span_s(self) -> float:
        return self.days * DAY_S


def diurnal(
    hour: npt.NDArray[np.float64], peak_to_trough: float, peak_hour: float
) -> npt.NDArray[np.float64]:
    """The daily curve: 1 at the trough, ``peak_to_trough`` at ``peak_hour``."""
    g = 0.5 * (1.0 + np.cos(2.0 * np.pi * (hour - peak_hour) / 24.0))
    return 1.0 + (peak_to_trough - 1.0) * g**2


def weekly(t: npt.NDArray[np.float64], config: SynthConfig) -> npt.NDArray[np.float64]:
    """1 on weekdays, ``weekend_factor`` at weekends, linear from 22:00 to 02:00 across midnight."""
    first = WEEKDAYS.index(config.start_day)
    days = np.arange(-1, math.ceil(config.days) + 2)
    factor = np.where((first + days) % 7 >= 5, config.weekend_factor, 1.0)
    knots = np.stack([days * DAY_S + 2 * HOUR_S, days * DAY_S + 22 * HOUR_S], axis=1).ravel()
    out: npt.NDArray[np.float64] = np.interp(t, knots, np.repeat(factor, 2))
    return out


def code_share(hour: npt.NDArray[np.float64], config: SynthConfig) -> npt.NDArray[np.float64]:
    """Probability that a request arriving at ``hour`` (local, 0..24) belongs to ``code``."""
    if config.mix == "steady":
        return np.full(np.shape(hour), config.code_share)
    swing = config.mix_swing * np.cos(2.0 * np.pi * (hour - config.peak_hour + SHARE_LEAD_H) / 24.0)
    return np.clip(config.code_share + swing, 0.0, 1.0)


def hour_of_day(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return (t % DAY_S) / HOUR_S


@dataclass(frozen=True)
class Bursts:
    start_s: npt.NDArray[np.float64]
    duration_s: npt.NDArray[np.float64]
    multiplier: npt.NDArray[np.float64]


def draw_bursts(config: SynthConfig, rng: np.random.Generator) -> Bursts:
    n = int(rng.poisson(config.bursts_per_day * config.days))
    return Bursts(
        np.sort(rng.uniform(0.0, config.span_s, n)),
        rng.uniform(*config.burst_seconds, n),
        rng.uniform(*config.burst_multiplier, n),
    )


@dataclass(frozen=True)
class Envelope:
    """The arrival rate as a step function on a grid: ``rate[i]`` over ``[edges[i], edges[i+1])``."""

    edges: npt.NDArray[np.float64]
    rate: npt.NDArray[np.float64]
    bursts: Bursts

    @functools.cached_property
    def integrated(self) -> npt.NDArray[np.float64]:
        """Expected arrivals from 0 to each edge."""
        return np.concatenate([[0.0], np.cumsum(self.rate * np.diff(self.edges))])

    def expected(self, edges: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Expected arrivals in each interval between consecutive ``edges``."""
        return np.diff(np.interp(edges, self.edges, self.integrated))


def envelope(config: SynthConfig, bursts: Bursts) -> Envelope:
    bins = math.ceil(config.span_s / config.step_s)
    edges = np.minimum(np.arange(bins + 1) * config.step_s, config.span_s)
    mid = 0.5 * (edges[:-1] + edges[1:])
    shape = weekly(mid, config) * diurnal(hour_of_day(mid), config.peak_to_trough, config.peak_hour)
    multiplier = np.ones(bins)
    for start, length, factor in zip(bursts.start_s, bursts.duration_s, bursts.multiplier, strict=True):
        first, last = np.searchsorted(mid, [start, start + length])
        if config.burst_overlap == "add":
            multiplier[first:last] += factor - 1.0
        else:
            multiplier[first:last] *= factor
    rate = shape * multiplier
    total = float(np.sum(rate * np.diff(edges)))
    return Envelope(edges, rate * (config.mean_rps * config.span_s / total), bursts)


def arrivals(env: Envelope, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Arrival times: a unit-rate Poisson process on the integrated rate, mapped back to time."""
    total = float(env.integrated[-1])
    points = np.sort(rng.uniform(0.0, total, int(rng.poisson(total))))
    return np.interp(points, env.integrated, env.edges)


@dataclass(frozen=True)
class Sizes:
    """One service's (prompt, generated) pairs to draw from."""

    name: str
    prompt: npt.NDArray[np.int64]
    generated: npt.NDArray[np.int64]
    source: str


def data_path(name: str) -> Path:
    return Path(str(resources.files("token_scaler") / "data" / name))


@functools.cache
def service_sizes(service: str) -> Sizes:
    """The (prompt, generated) pairs of the shipped Azure 2023 trace of ``service``."""
    if service not in SERVICE_FILES:
        raise ConfigError(f"service={service!r}: expected one of {', '.join(SERVICES)}")
    path = data_path(SERVICE_FILES[service])
    with open(path) as handle:
        header = handle.readline().strip()
        if header != "TIMESTAMP,ContextTokens,GeneratedTokens":
            raise TraceError(f"{path}: header {header!r}, expected TIMESTAMP,ContextTokens,GeneratedTokens")
        # the timestamps are not needed; numpy reads the two size columns ~20x faster than load_csv
        sizes = np.loadtxt(handle, delimiter=",", usecols=(1, 2), dtype=np.int64, ndmin=2)
    return Sizes(service, sizes[:, 0], sizes[:, 1], str(path))


@dataclass(frozen=True)
class Synthesized:
    """A synthesized trace with what made it: ``service[i]`` indexes ``SERVICES`` for request i,
    ``clock_start_s`` is the first arrival's time since midnight of ``start_day`` (the trace
    counts from the first arrival, as every ``Trace`` does)."""

    trace: Trace
    service: npt.NDArray[np.int8]
    clock_start_s: float
    envelope: Envelope
    config: SynthConfig

    @property
    def clock_s(self) -> npt.NDArray[np.float64]:
        """Arrival times since midnight of ``start_day``."""
        return self.trace.arrival_s + self.clock_start_s


def generate(config: SynthConfig) -> Synthesized:
    burst_rng, arrival_rng, size_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3)
    )
    env = envelope(config, draw_bursts(config, burst_rng))
    t = arrivals(env, arrival_rng)
    is_code = size_rng.random(len(t)) < code_share(hour_of_day(t), config)
    service = np.where(is_code, 0, 1).astype(np.int8)
    prompt = np.empty(len(t), dtype=np.int64)
    generated = np.empty(len(t), dtype=np.int64)
    used = []
    for index, name in enumerate(SERVICES):
        mine = service == index
        count = int(np.count_nonzero(mine))
        if not count:
            continue
        sizes = service_sizes(name)
        pick = size_rng.integers(0, len(sizes.prompt), count)
        prompt[mine], generated[mine] = sizes.prompt[pick], sizes.generated[pick]
        used.append(name)
    start = float(t[0]) if len(t) else 0.0
    source = f"synthesized: {config.days:g} days, {config.mix} mix, seed {config.seed}"
    attribution = SIZES_ATTRIBUTION.format(services=", ".join(used) or "none drawn")
    trace = Trace(t - start, prompt, generated, source, attribution)
    return Synthesized(trace, service, start, env, config)


def synthesize(config: SynthConfig | None = None) -> Trace:
    """A synthesized trace (see the module docstring); ``SynthConfig()`` is a week at 2 req/s."""
    return generate(config or SynthConfig()).trace
