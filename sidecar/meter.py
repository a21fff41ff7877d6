"""Per-request token accounting for the stream record (pure: no I/O, no clock).

Each request moves through arrive -> first token -> generated pieces -> finish (or
abort). Counters are kept as deltas since the last ``take()``; gauges as running sums
of every open request's own contribution, so they can never go negative and return to
exactly zero when the last request ends.

Invariants, over a request's whole life (tested with hypothesis over random event
sequences in tests/sidecar/test_sidecar_meter.py):

    sum(sp) == sum(ap) == final prompt tokens
    sum(sg) == sum(ag) == final generated tokens
    sum(ar) == sum(rq) == 1, both under the request's last label (an aborted request arrived too)
    the request leaves nothing in ``in``, ``wf``, ``bp``, ``bg``
    per tenant: sum(p) == sum(sp) and sum(g) == sum(sg) of that tenant's requests

"Final" is the response's ``usage`` when the server reports it; otherwise what the
proxy counted (a tokenizer over the generated text, or the pieces streamed), and after
a failure or a client disconnect what had been served by then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from token_scaler.record import ModelCounts, TenantCounts

# Generated tokens per choice assumed for a model before any of its requests ended.
DEFAULT_GENERATION_ESTIMATE = 256
# Weight of the newest request in the running mean of generated tokens per choice.
DEFAULT_EWMA_ALPHA = 0.1


@dataclass(slots=True, eq=False)
class Request:
    model: str
    tenant: str
    n: int
    prompt_estimate: int
    sp: int = 0  # what this request has put in each counter so far
    sg: int = 0
    ap: int = 0
    ag: int = 0
    bp: int = 0  # what it holds in the backlog gauges
    bg: int = 0
    waiting: bool = True
    done: bool = False


@dataclass(slots=True)
class _Model:
    counts: ModelCounts = field(default_factory=ModelCounts)  # counters: deltas; gauges: running
    mean_generation: float | None = None
    reported: bool = False  # in the last snapshot with a gauge above zero


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: dict[str, ModelCounts]
    tenants: dict[str, dict[str, TenantCounts]]


class Meter:
    def __init__(
        self,
        default_generation: int = DEFAULT_GENERATION_ESTIMATE,
        ewma_alpha: float = DEFAULT_EWMA_ALPHA,
    ) -> None:
        self._default_generation = default_generation
        self._alpha = ewma_alpha
        self._models: dict[str, _Model] = {}
        self._tenants: dict[str, dict[str, TenantCounts]] = {}

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = _Model()
        return model

    def _tenant(self, request: Request) -> TenantCounts:
        per_model = self._tenants.setdefault(request.tenant, {})
        counts = per_model.get(request.model)
        if counts is None:
            counts = per_model[request.model] = TenantCounts()
        return counts

    def seed_generation_means(self, means: Mapping[str, float]) -> None:
        """Start from the workload's recent means (read from its stream at start-up) instead
        of the default, for models this sidecar has not yet seen a request of: a new replica
        then estimates arrivals like its peers, instead of over-reporting demand after each
        scale-up."""
        for name, mean in means.items():
            model = self._model(name)
            if model.mean_generation is None and mean >= 0:
                model.mean_generation = mean

    def generation_estimate(self, model: str, max_tokens: int | None, n: int = 1) -> int:
        """n x min(max_tokens, the model's recent mean per choice), or the mean alone."""
        known = self._models.get(model)
        mean = known.mean_generation if known is not None else None
        per_choice = round(mean) if mean is not None else self._default_generation
        if max_tokens is not None:
            per_choice = min(per_choice, max_tokens)
        return max(0, per_choice) * max(1, n)

    def arrive(
        self, model: str, tenant: str, prompt_estimate: int, generation_estimate: int, n: int = 1
    ) -> Request:
        prompt_estimate = max(0, prompt_estimate)
        generation_estimate = max(0, generation_estimate)
        request = Request(model, tenant, max(1, n), prompt_estimate)
        counts = self._model(model).counts
        counts.arrived_prompt += prompt_estimate
        counts.arrived_generation += generation_estimate
        counts.arrived_requests += 1
        counts.backlog_prompt += prompt_estimate
        counts.backlog_generation += generation_estimate
        counts.inflight += 1
        counts.waiting += 1
        request.ap = request.bp = prompt_estimate
        request.ag = request.bg = generation_estimate
        return request

    def first_token(self, request: Request) -> None:
        """The prompt is processed: its estimate moves from backlog to served."""
        if not request.waiting or request.done:
            return
        request.waiting = False
        counts = self._models[request.model].counts
        counts.waiting -= 1
        counts.backlog_prompt -= request.bp
        request.bp = 0
        counts.served_prompt += request.prompt_estimate
        request.sp += request.prompt_estimate
        self._tenant(request).prompt += request.prompt_estimate

    def generated(self, request: Request, tokens: int) -> None:
        """Tokens streamed to the client, counted as they pass (corrected at the end)."""
        if tokens <= 0 or request.done:
            return
        self.first_token(request)
        counts = self._models[request.model].counts
        counts.served_generation += tokens
        request.sg += tokens
        self._tenant(request).generation += tokens
        taken = min(tokens, request.bg)
        request.bg -= taken
        counts.backlog_generation -= taken

    def finish(self, request: Request, prompt: int, generation: int, *, complete: bool = True) -> None:
        """Settle the request at its final counts; ``complete`` ones teach the mean."""
        if request.done:
            return
        request.done = True
        prompt = max(0, prompt)
        generation = max(0, generation)
        model = self._models[request.model]
        counts = model.counts
        if request.waiting:
            request.waiting = False
            counts.waiting -= 1
        counts.inflight -= 1
        counts.backlog_prompt -= request.bp
        counts.backlog_generation -= request.bg
        request.bp = request.bg = 0
        counts.served_prompt += prompt - request.sp
        counts.served_generation += generation - request.sg
        counts.arrived_prompt += prompt - request.ap
        counts.arrived_generation += generation - request.ag
        counts.requests += 1
        tenant = self._tenant(request)
        tenant.prompt += prompt - request.sp
        tenant.generation += generation - request.sg
        tenant.requests += 1
        request.sp = request.ap = prompt
        request.sg = request.ag = generation
        if complete:
            per_choice = generation / request.n
            mean = model.mean_generation
            model.mean_generation = per_choice if mean is None else mean + self._alpha * (per_choice - mean)

    def relabel(self, request: Request, model: str) -> None:
        """Move an open request, and what it counted so far, to another model label."""
        if request.done or model == request.model:
            return
        served = self._tenant(request)
        served.prompt -= request.sp
        served.generation -= request.sg
        for counts, sign in ((self._models[request.model].counts, -1), (self._model(model).counts, 1)):
            counts.arrived_prompt += sign * request.ap
            counts.arrived_generation += sign * request.ag
            counts.arrived_requests += sign  # an open request: it arrived, under request.model
            counts.served_prompt += sign * request.sp
            counts.served_generation += sign * request.sg
            counts.backlog_prompt += sign * request.bp
            counts.backlog_generation += sign * request.bg
            counts.inflight += sign
            counts.waiting += sign * request.waiting
        request.model = model
        served = self._tenant(request)
        served.prompt += request.sp
        served.generation += request.sg

    def abort(self, request: Request) -> None:
        """A failure or a disconnect: what was served by then is what counts."""
        self.finish(request, request.sp, request.sg, complete=False)

    def take(self) -> Snapshot:
        """Counter deltas since the last call, and gauges now; counters restart at zero.

        A model appears while it has activity or open requests, and once more after its
        gauges fall to zero, so a reader sees them drop.
        """
        models: dict[str, ModelCounts] = {}
        for name, model in self._models.items():
            c = model.counts
            busy = c.inflight or c.waiting or c.backlog_prompt or c.backlog_generation
            if busy or model.reported or any(c.counters()):
                models[name] = ModelCounts(*c.as_list())
            model.reported = bool(busy)
            c.clear_counters()
        tenants = {
            tenant: {m: c for m, c in per_model.items() if c.prompt or c.generation or c.requests}
            for tenant, per_model in self._tenants.items()
        }
        self._tenants = {}
        return Snapshot(models, {t: per_model for t, per_model in tenants.items() if per_model})

    def open_totals(self) -> tuple[int, int, int]:
        """Requests in flight, and their prompt and generation tokens not served yet, over
        all models (what the sidecar announces to gateways)."""
        counts = [m.counts for m in self._models.values()]
        return (
            sum(c.inflight for c in counts),
            sum(c.backlog_prompt for c in counts),
            sum(c.backlog_generation for c in counts),
        )


class LabelBound:
    """Keeps a label's values to the first ``limit`` seen; the rest become ``other``.

    Tenant ids come from a request header and model names from the request body: user
    input, so unbounded. First-come rather than top-N by volume: a Prometheus series
    cannot move to another label once it exists, so the set must not churn.
    """

    def __init__(self, limit: int, other: str = "other", max_length: int = 128) -> None:
        self._limit = limit
        self._other = other
        self._max_length = max_length
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit or len(value) > self._max_length or not value.isprintable():
            return self._other
        self._seen.add(value)
        return value
