"""Plausibility bounds on a response's ``usage``: what the request and the response allow.

The sidecar counts a request at its server's ``usage``. A usage no honest server can
report (a bug, a proxy in between, an upstream nobody here controls) would otherwise go
into the stream, the metrics and the tenant's budget as it came. Each field is held to
what the exchange itself allows:

generation (``completion_tokens`` / ``output_tokens``), the smaller of
  - ``choices x max_tokens + slack`` when the request, or the policy, set a maximum
    (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``); ``choices`` is
    ``n``, or ``best_of`` when the server generates more than it returns;
  - ``visible bytes + slack + hidden reasoning``: a visible token is at least one byte of
    text in a byte-level tokenizer, so the text that passed bounds them. Visible bytes
    are, in a stream, the UTF-8 bytes of the generated text in each event the sidecar
    understands plus all the bytes of each event it does not (role and finish chunks,
    the Responses API's other events, shapes it does not know) but the one with the usage
    once text has passed, and for a whole answer the size of the response body. Hidden reasoning
    (``completion_tokens_details.reasoning_tokens``, ``output_tokens_details.reasoning_tokens``)
    passes as no text: it is bounded by the maximum, or without one by how long the
    request took, at ``HIDDEN_TOKENS_PER_SECOND`` per choice (several times the fastest
    single-stream decoding served today) plus ``HIDDEN_TOKENS_SLACK`` per choice. Left out
    when ``best_of`` exceeds ``n`` (completions generated and not returned).
  ``slack`` is, per choice, ``SPECIAL_TOKENS_PER_CHOICE`` (end of turn, tool-call and
  thinking markers: tokens that decode to no text) plus the bytes of the request's
  ``stop`` strings (``stop_sequences`` in the Messages API: generated, then cut from the text).
  Anthropic's extended thinking (``"thinking"`` in a Messages request) streams summarised
  if at all, and ``output_tokens`` counts all of it: such a request is bounded by its
  maximum alone.
prompt (``prompt_tokens`` / ``input_tokens``): the request body's bytes plus
  ``PROMPT_TEMPLATE_TOKENS`` (chat template, a default system prompt, tool instructions)
  plus ``MEDIA_PART_TOKENS`` for each image, audio, video or file part. Not bounded when
  a Responses API request names state kept by the server (``previous_response_id``,
  ``conversation``, a stored ``prompt``), or a Messages request a server tool (web search
  or fetch, code execution, MCP servers): its prompt is not all in the body.

A field outside its bound is replaced by the sidecar's own count of what passed (the
prompt estimate; the tokenizer or the streamed pieces for generation), counted in
``tokenscaler_usage_implausible_total{field}`` and logged once per model with the values.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from prometheus_client import Counter

from sidecar.openai import Kind, ParsedRequest, Usage

log = logging.getLogger(__name__)

SPECIAL_TOKENS_PER_CHOICE = 64
PROMPT_TEMPLATE_TOKENS = 1024
MEDIA_PART_TOKENS = 65536
HIDDEN_TOKENS_PER_SECOND = 20_000
HIDDEN_TOKENS_SLACK = 4096

_BEST_OF = re.compile(rb'"best_of"\s*:\s*(\d{1,9})')
_STRING = rb'"(?:[^"\\]|\\.)*"'
_STOP = re.compile(
    rb'"stop(?:_sequences)?"\s*:\s*(' + _STRING + rb"|\[(?:[^\]\"]|" + _STRING + rb")*\])", re.DOTALL
)
_MEDIA = re.compile(rb'"(?:image_url|input_image|input_audio|video_url|input_file|file|image|document)"')
_SERVER_STATE = (b'"previous_response_id"', b'"conversation"', b'"prompt"')
# Messages API: server tools (search results, fetched pages, containers) add input the body lacks.
_SERVER_INPUT = (b'"web_search', b'"web_fetch', b'"mcp_servers"', b'"container"', b'"code_execution')


@dataclass(slots=True)  # not frozen: a frozen dataclass takes microseconds to build
class RequestFacts:
    """What the bounds need from the request as sent upstream."""

    body_bytes: int
    choices: int  # completions the server generates: max(n, best_of)
    hidden_choices: bool  # best_of > n: some are generated and never returned
    max_tokens: int | None  # per choice, from the request or the policy
    stop_bytes: int
    media_parts: int
    server_state: bool  # the prompt is partly kept by the server (Responses API)


def request_facts(parsed: ParsedRequest, body: bytes, max_tokens: int | None) -> RequestFacts:
    """Facts from byte scans of the body: a key's quotes are never escaped inside a JSON
    string, so a match is a key or a string value equal to it, and either only widens
    a bound."""
    choices = parsed.n
    hidden = False
    if parsed.kind is Kind.MESSAGES and b'"thinking"' in body:
        # Extended thinking: output tokens the stream shows only summarised, if at all.
        hidden = True
    if parsed.kind is Kind.COMPLETIONS and b'"best_of"' in body:
        found = _BEST_OF.search(body)
        best_of = int(found.group(1)) if found else 0
        hidden = best_of > choices
        choices = max(choices, best_of)
    stop_bytes = 0
    if parsed.kind is not Kind.EMBEDDINGS and b'"stop"' in body:
        stop = _STOP.search(body)
        stop_bytes = len(stop.group(1)) if stop else 0  # no such key: the word was a value
    media = 0
    if parsed.kind in (Kind.CHAT, Kind.RESPONSES, Kind.MESSAGES) and b'"type"' in body:  # parts have a type
        media = len(_MEDIA.findall(body))
    state = parsed.kind is Kind.RESPONSES and any(marker in body for marker in _SERVER_STATE)
    state = state or (parsed.kind is Kind.MESSAGES and any(marker in body for marker in _SERVER_INPUT))
    return RequestFacts(len(body), choices, hidden, max_tokens, stop_bytes, media, state)


def text_bytes(texts: Iterable[str]) -> int:
    """UTF-8 bytes of the texts (ASCII strings are not encoded: their length is it)."""
    return sum(len(t) if t.isascii() else len(t.encode()) for t in texts)


@dataclass(slots=True)
class Bounds:
    prompt: int | None  # None: not bounded here
    generation: int | None
    why_generation: str


def bounds(facts: RequestFacts, usage: Usage, seen_bytes: int, elapsed_s: float) -> Bounds:
    """The highest prompt and generation counts the exchange allows (``elapsed_s``: from the
    request's arrival to the usage)."""
    prompt = None
    if not facts.server_state:
        prompt = facts.body_bytes + PROMPT_TEMPLATE_TOKENS + facts.media_parts * MEDIA_PART_TOKENS
    slack = facts.choices * (SPECIAL_TOKENS_PER_CHOICE + facts.stop_bytes)
    cap = None if facts.max_tokens is None else facts.choices * facts.max_tokens + slack
    if cap is None:
        most = facts.choices * (int(HIDDEN_TOKENS_PER_SECOND * elapsed_s) + HIDDEN_TOKENS_SLACK)
        reasoning = min(usage.reasoning, most)
    else:
        reasoning = min(usage.reasoning, cap)
    text = None if facts.hidden_choices else seen_bytes + slack + reasoning
    if cap is not None and (text is None or cap <= text):
        why = f"{facts.choices} x max_tokens {facts.max_tokens} + slack {slack}"
        return Bounds(prompt, cap, why)
    if text is not None:
        why = f"{seen_bytes} bytes of text seen + slack {slack} + hidden reasoning {reasoning}"
        return Bounds(prompt, text, why)
    return Bounds(prompt, None, "")


class UsageGuard:
    """Applies the bounds; counts and logs (once per model) what it replaces."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._logged: set[str] = set()

    def check(
        self,
        model: str,
        facts: RequestFacts,
        usage: Usage,
        seen_bytes: int,
        elapsed_s: float,
        own_prompt: int,
        own_generation: Callable[[], int],
    ) -> Usage:
        """``usage`` if it is within its bounds, else with each field outside them replaced."""
        found = bounds(facts, usage, seen_bytes, elapsed_s)
        prompt, generation = usage.prompt, usage.generation
        replaced: list[str] = []
        if found.prompt is not None and prompt > found.prompt:
            prompt = min(own_prompt, found.prompt)
            replaced.append(f"prompt {usage.prompt} > {found.prompt} (request body {facts.body_bytes} bytes)")
            self.counter.labels("prompt").inc()
        if found.generation is not None and generation > found.generation:
            generation = min(own_generation(), found.generation)
            replaced.append(f"generation {usage.generation} > {found.generation} ({found.why_generation})")
            self.counter.labels("generation").inc()
        if not replaced:
            return usage
        if model not in self._logged:
            self._logged.add(model)
            log.warning(
                "model %s: implausible usage from the model server: %s; counted %d prompt and %d "
                "generated tokens instead (the sidecar's own count). Further ones of this model are "
                "only counted in tokenscaler_usage_implausible_total",
                model,
                "; ".join(replaced),
                prompt,
                generation,
            )
        return replace(usage, prompt=prompt, generation=generation)
