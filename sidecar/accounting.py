"""The tokens of each counted request: estimated on arrival, counted as they pass, settled at the end.

On arrival a request is metered at its prompt estimate and expected generation (meter.py),
under bounded model and tenant labels (labels.py, ``LabelBound``). A stream is counted event by
event as it passes (``event``), a whole answer when it is read (``answer``). At the end the
request settles (``settle``) at the ``usage`` the server reported, once bounded by what the
request could have produced (usage_bounds.py); without it, at the sidecar's own count; a
non-streamed request whose client left at an estimate of what was generated meanwhile
(abandon.py); after a failure, at what was served by then.

Requests a downgrade sends to another model server are that server's demand, not this
workload's: their counts go to a meter whose snapshots are discarded (``elsewhere``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from sidecar import openai, wires
from sidecar.abandon import Abandoned
from sidecar.exchange import Exchange
from sidecar.labels import ModelLabels
from sidecar.meter import LabelBound, Meter, Request
from sidecar.metrics import Metrics
from sidecar.openai import Kind, ParsedRequest, Usage
from sidecar.policy.admission import Admission
from sidecar.responses import CLIENT_GONE
from sidecar.sse import Event
from sidecar.tokens import TokenCounter, count_texts
from sidecar.usage_bounds import UsageGuard, request_facts, text_bytes

log = logging.getLogger(__name__)


class Accounting:
    def __init__(
        self, meter: Meter, metrics: Metrics, counter: TokenCounter, tenants: LabelBound, models: ModelLabels
    ) -> None:
        self.meter = meter
        self.elsewhere = Meter()
        self.metrics = metrics
        self.counter = counter
        self.tenants = tenants
        self.models = models
        self.guard = UsageGuard(metrics.usage_implausible)
        self.abandoned = Abandoned()
        # Keep generated text only when a tokenizer can make something of it.
        self._keep_texts = counter.name == "tokenizer"

    def _meter(self, exchange: Exchange) -> Meter:
        return self.meter if exchange.upstream is None else self.elsewhere

    def arrive(
        self,
        parsed: ParsedRequest,
        body: bytes,
        prompt: int,
        max_tokens: int | None,
        name: str,
        tenant: str,
        inject: bool,
        admission: Admission | None,
    ) -> tuple[Request, Exchange]:
        """Meter a request as it goes upstream (``body`` as sent, ``name`` the model asked for,
        ``tenant`` not yet bounded), in flight until it settles."""
        tenant = self.tenants(tenant)
        model = self.models(name)
        meter = self.meter if admission is None or admission.upstream is None else self.elsewhere
        generation = 0
        if parsed.kind is not Kind.EMBEDDINGS:
            generation = meter.generation_estimate(model, max_tokens, parsed.n)
        metered = meter.arrive(model, tenant, prompt, generation, parsed.n)
        exchange = Exchange(parsed.kind, inject, time.monotonic(), self.metrics.series(model, tenant), name)
        exchange.facts = request_facts(parsed, body, max_tokens)
        if not parsed.stream:
            exchange.reserved = max_tokens * parsed.n if max_tokens is not None else generation
        if admission is not None:
            exchange.upstream = admission.upstream
            exchange.headers = admission.headers
            exchange.stream_limit = admission.stream_limit
        exchange.series.inflight.inc()
        exchange.series.waiting.inc()
        return metered, exchange

    def labelled(self, metered: Request, exchange: Exchange) -> None:
        """The server answers a model not yet a label: it becomes one, with this request (labels.py)."""
        label = self.models.confirm(exchange.name)
        if label == metered.model:
            return
        self._meter(exchange).relabel(metered, label)
        old = exchange.series
        old.inflight.dec()
        old.waiting.dec()
        exchange.series = self.metrics.series(label, metered.tenant)
        exchange.series.inflight.inc()
        exchange.series.waiting.inc()

    def answer(self, exchange: Exchange, body: bytes) -> None:
        """Count a whole (non-streamed) answer."""
        if exchange.failed:
            return
        parsed = wires.of(exchange.kind).parse_response(exchange.kind, body)
        exchange.seen_bytes = len(body)
        if parsed is None:
            exchange.malformed = True
        else:
            exchange.usage = parsed.usage
            exchange.response_model = parsed.model
            exchange.texts.extend(parsed.texts)
            exchange.pieces = len(parsed.texts)

    def event(self, event: Event, metered: Request, exchange: Exchange) -> bytes:
        """Count one event of a stream; return the bytes the client gets for it."""
        if exchange.cut:
            return b""
        if event.malformed:
            exchange.malformed = True
        if event.data is None:
            return event.raw
        chunk = wires.of(exchange.kind).parse_chunk(exchange.kind, event.data, exchange.usage)
        if chunk is None:
            exchange.malformed = True
            exchange.seen_bytes += len(event.raw)
            return event.raw
        if chunk.pieces:
            exchange.seen_bytes += text_bytes(chunk.texts)
        elif chunk.usage is None or not exchange.pieces:
            # the usage event repeats what passed in pieces before it (or holds nothing)
            exchange.seen_bytes += len(event.raw)
        if chunk.pieces:
            limit = exchange.stream_limit
            if limit is not None and exchange.pieces + chunk.pieces > limit:
                exchange.cut = True
                return b""
            if exchange.first_at is None:
                exchange.first_at = time.monotonic()
                exchange.series.waiting.dec()
            exchange.pieces += chunk.pieces
            self._meter(exchange).generated(metered, chunk.pieces)
            if self._keep_texts:
                exchange.texts.extend(chunk.texts)
        if chunk.usage is not None:
            exchange.usage = chunk.usage
            exchange.response_model = chunk.model
        if exchange.inject:
            if chunk.usage_only:
                return b""
            if chunk.null_usage:
                return openai.strip_null_usage(event.raw)
        return event.raw

    def _own_generation(self, exchange: Exchange) -> int:
        """Generated tokens as the sidecar counted them: a whole answer's text (or a stream's,
        with a tokenizer) through the token counter, else one token per streamed piece."""
        if self._keep_texts or not exchange.streamed:
            return count_texts(self.counter, exchange.texts)
        return exchange.pieces

    def settle(self, metered: Request, exchange: Exchange) -> tuple[int, int]:
        """Final counts: usage, else the fallback count; after a failure, what was served."""
        series = exchange.series
        now = time.monotonic()
        self._end_series(metered.model, exchange, now)
        usage = self._checked_usage(metered, exchange)
        prompt, generation = self._final_counts(metered, exchange, usage, now)
        series.prompt_tokens.inc(prompt)
        series.generation_tokens.inc(generation)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request model=%s tenant=%s code=%s prompt=%d generation=%d ttft=%s duration=%.3f usage=%s",
                metered.model,
                metered.tenant,
                exchange.code,
                prompt,
                generation,
                "-" if exchange.first_at is None else f"{exchange.first_at - exchange.started:.3f}",
                now - exchange.started,
                "reported" if usage is not None else "estimated",
            )
        return prompt, generation

    def _end_series(self, model: str, exchange: Exchange, now: float) -> None:
        """The request leaves the waiting/in-flight gauges; its timings and outcome are observed."""
        series = exchange.series
        if exchange.first_at is None:
            series.waiting.dec()
        else:
            series.ttft.observe(exchange.first_at - exchange.started)
        series.inflight.dec()
        series.duration.observe(now - exchange.started)
        series.request_ended(exchange.code)
        if exchange.malformed:
            self.metrics.malformed.labels(model).inc()

    def _checked_usage(self, metered: Request, exchange: Exchange) -> Usage | None:
        """The server's usage, raised to the pieces that passed when it is not final and
        bounded by what the request could have produced; None without usage."""
        usage = exchange.usage
        if usage is not None and not usage.final:
            # A stream that ended before its final usage: at least the pieces that passed.
            usage = replace(usage, generation=max(usage.generation, self._own_generation(exchange)))
        if usage is not None and exchange.facts is not None:
            usage = self.guard.check(
                metered.model,
                exchange.facts,
                usage,
                exchange.seen_bytes,
                time.monotonic() - exchange.started,
                metered.prompt_estimate,
                lambda: self._own_generation(exchange),
            )
        return usage

    def _final_counts(
        self, metered: Request, exchange: Exchange, usage: Usage | None, now: float
    ) -> tuple[int, int]:
        """Finish (or abort) the metered request at its final prompt and generation counts:
        the usage; else an abandoned request's estimate; else, after a failure, what was
        metered; else the sidecar's own count."""
        meter = self._meter(exchange)
        model, tenant = metered.model, metered.tenant
        if usage is not None:
            meter.finish(metered, usage.prompt, usage.generation, complete=not exchange.failed)
            prompt, generation = usage.prompt, usage.generation
            read = min(usage.cache_read, prompt)
            exchange.cached = (read, min(usage.cache_write, prompt - read))
            if not exchange.failed:
                self.abandoned.observe(exchange.name, generation, now - exchange.started)
        elif exchange.code == CLIENT_GONE and exchange.reserved is not None:
            prompt = metered.prompt_estimate
            seconds = now - exchange.started
            generation, method = self.abandoned.generation(exchange.name, seconds, exchange.reserved)
            meter.finish(metered, prompt, generation, complete=False)
            self._estimated(model, tenant, prompt, generation, method)
        elif exchange.failed:
            meter.abort(metered)
            prompt, generation = metered.sp, metered.sg
        else:
            prompt = metered.prompt_estimate
            # A whole answer is text at hand; a stream's text is kept only for a tokenizer,
            # else each piece streamed counts as one token.
            by_text = self._keep_texts or not exchange.streamed
            generation = self._own_generation(exchange)
            meter.finish(metered, prompt, generation)
            self._estimated(model, tenant, prompt, generation, self.counter.name if by_text else "pieces")
        return prompt, generation

    def _estimated(self, model: str, tenant: str, prompt: int, generation: int, method: str) -> None:
        """Tokens the sidecar estimated rather than read from ``usage``, by how."""
        self.metrics.estimated_tokens.labels("prompt", model, tenant, self.counter.name).inc(prompt)
        self.metrics.estimated_tokens.labels("generation", model, tenant, method).inc(generation)
