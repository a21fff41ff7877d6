"""Usage bounds: an honest server's usage is never altered; an implausible one is replaced.

Through a real sidecar in front of a scripted model server, driven by the ``openai`` SDK:
hypothesis draws honest generations (``tests/sidecar/scripted_upstream.py``) across
chat, completions and the Responses API, streamed or not, n > 1, best_of, stop strings,
tool calls, visible and hidden reasoning and multi-byte text, and the sidecar's counts
must equal the usage the server reported with nothing counted as implausible.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from sidecar.config import SidecarConfig
from sidecar.openai import Kind, Usage, parse_request, usage_of
from sidecar.server import Sidecar
from sidecar.usage_bounds import (
    HIDDEN_TOKENS_PER_SECOND,
    HIDDEN_TOKENS_SLACK,
    PROMPT_TEMPLATE_TOKENS,
    SPECIAL_TOKENS_PER_CHOICE,
    bounds,
    request_facts,
    text_bytes,
)
from tests.conftest import delete_keys
from tests.sidecar.conftest import StartSidecar, scope
from tests.sidecar.policy.test_policy_proxy import settled, used, write_policy
from tests.sidecar.scripted_upstream import (
    Choice,
    Generation,
    LoopThread,
    Script,
    ScriptedUpstream,
    ToolCall,
    render_chat,
    render_completion,
    render_responses,
)
from token_scaler.record import KEY_PREFIX

MODEL = "honest-model"
ALPHABET = 'ab Z\n"\\é中😀{}:,'
_ids = itertools.count()

# -- pure --------------------------------------------------------------------------------------


def facts_of(kind: Kind, doc: dict[str, Any], max_tokens: int | None = None) -> Any:
    body = json.dumps(doc).encode()
    parsed = parse_request(kind, body)
    assert parsed is not None
    return request_facts(parsed, body, parsed.max_tokens if max_tokens is None else max_tokens)


def test_request_facts() -> None:
    facts = facts_of(Kind.COMPLETIONS, {"model": "m", "prompt": "x", "n": 2, "best_of": 5, "max_tokens": 9})
    assert (facts.choices, facts.hidden_choices, facts.max_tokens) == (5, True, 9)
    facts = facts_of(Kind.CHAT, {"model": "m", "messages": [], "stop": ["END", '\\"]']})
    assert facts.stop_bytes == len(json.dumps(["END", '\\"]']).encode())
    assert facts_of(Kind.CHAT, {"model": "m", "messages": [], "stop": None}).stop_bytes == 0
    # "stop" as a value, not a key, widens nothing
    assert facts_of(Kind.CHAT, {"model": "m", "messages": [{"content": "stop"}]}).stop_bytes == 0
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    facts = facts_of(Kind.CHAT, {"model": "m", "messages": [{"role": "user", "content": [image]}]})
    assert facts.media_parts >= 1 and not facts.server_state
    facts = facts_of(Kind.RESPONSES, {"model": "m", "input": "hi", "previous_response_id": "resp_1"})
    assert facts.server_state
    # the policy's max_tokens counts as the request's
    assert facts_of(Kind.CHAT, {"model": "m", "messages": []}, max_tokens=7).max_tokens == 7


def test_bounds_hold_each_field_to_what_the_exchange_allows() -> None:
    facts = facts_of(Kind.CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2})
    found = bounds(facts, Usage(10, 10, 0), seen_bytes=30, elapsed_s=0)
    assert found.prompt == facts.body_bytes + PROMPT_TEMPLATE_TOKENS
    assert found.generation == 30 + 2 * SPECIAL_TOKENS_PER_CHOICE
    # max_tokens is tighter than the text here; hidden reasoning widens only the text's bound
    facts = facts_of(Kind.CHAT, {"model": "m", "messages": [], "max_completion_tokens": 5})
    assert bounds(facts, Usage(1, 1, 0), 1000, 0).generation == 5 + SPECIAL_TOKENS_PER_CHOICE
    found = bounds(facts, Usage(1, 1, 10**15), 0, 0)
    assert found.generation == 5 + SPECIAL_TOKENS_PER_CHOICE  # reasoning is bounded by the maximum
    # best_of > n: the text does not bound the completions never returned
    facts = facts_of(Kind.COMPLETIONS, {"model": "m", "prompt": "x", "best_of": 3})
    assert bounds(facts, Usage(1, 1, 0), 10, 0).generation is None
    # without a maximum, hidden reasoning is bounded by the time the request took
    facts = facts_of(Kind.CHAT, {"model": "m", "messages": []})
    found = bounds(facts, Usage(1, 1, 10**15), 100, elapsed_s=2.0)
    assert (
        found.generation
        == 100 + SPECIAL_TOKENS_PER_CHOICE + 2 * HIDDEN_TOKENS_PER_SECOND + HIDDEN_TOKENS_SLACK
    )
    assert text_bytes(["é中😀", "ab"]) == 2 + 3 + 4 + 2


# -- the honest model, rendered ------------------------------------------------------------------

tokens_st = st.lists(st.text(ALPHABET, min_size=1, max_size=3), max_size=25)


@st.composite
def tool_calls(draw: st.DrawFn) -> ToolCall:
    args = json.dumps(
        draw(
            st.dictionaries(st.text("abc", min_size=1, max_size=4), st.text(ALPHABET, max_size=6), max_size=3)
        ),
        ensure_ascii=False,
    )
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(args) - 1)), max_size=len(args))))
    pieces = [args[a:b] for a, b in itertools.pairwise([0, *cuts, len(args)]) if args[a:b]]
    name = draw(st.lists(st.text("abcdefgh_", min_size=1, max_size=4), min_size=1, max_size=4))
    return ToolCall(name, pieces, draw(st.integers(0, 12)))


@dataclass
class Case:
    kind: Kind
    stream: bool
    per_chunk: int
    generation: Generation
    request: dict[str, Any]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from([Kind.CHAT, Kind.COMPLETIONS, Kind.RESPONSES]))
    stream = draw(st.booleans())
    n = 1 if kind is Kind.RESPONSES else draw(st.integers(1, 3))
    tools = kind is not Kind.COMPLETIONS and draw(st.booleans())
    reasoning = kind is not Kind.COMPLETIONS and draw(st.booleans())
    stop = draw(
        st.one_of(st.none(), st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=2))
    )
    if kind is Kind.RESPONSES:
        stop = None
    stop_room = min(len(s.encode()) for s in stop) if stop else 0
    choices = [
        Choice(
            content=draw(tokens_st),
            reasoning=draw(tokens_st) if reasoning else [],
            tools=draw(st.lists(tool_calls(), max_size=3)) if tools else [],
            silent=draw(st.integers(0, 8)),
            cut=draw(st.integers(0, stop_room)),
        )
        for _ in range(n)
    ]
    hidden = draw(st.integers(0, 3000)) if reasoning else 0
    text = draw(st.text(ALPHABET, max_size=200))
    prompt_tokens = draw(st.integers(0, len(text.encode()) + 10))
    longest = max(c.tokens() for c in choices) + hidden
    # a limit of 0 is refused (as vLLM refuses it): the smallest honest limit is 1
    max_tokens = draw(st.one_of(st.none(), st.integers(max(1, longest), longest + 50)))
    hidden_choices: list[int] = []
    request: dict[str, Any] = {"model": MODEL, "stream": stream}
    # best_of above n (hidden choices) is refused by the proxy's strict fields, so an honest
    # request here never has it; request_facts' handling of it is checked on its own above
    if kind is Kind.COMPLETIONS and not stream and draw(st.booleans()):
        request["best_of"] = n
    if kind is Kind.CHAT:
        request["messages"] = [{"role": "user", "content": text}]
        if draw(st.booleans()):
            request["response_format"] = {"type": "json_object"}
        if tools:
            request["tools"] = [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ]
        if max_tokens is not None:
            request[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = max_tokens
    elif kind is Kind.COMPLETIONS:
        request["prompt"] = text
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
    else:
        request["input"] = text
        if tools:
            request["tools"] = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
        if max_tokens is not None:
            request["max_output_tokens"] = max_tokens
    if n > 1:
        request["n"] = n
    if stop:
        request["stop"] = stop
    generation = Generation(choices, hidden, hidden_choices, prompt_tokens)
    return Case(kind, stream, draw(st.integers(1, 4)), generation, request)


def script_of(case: Case) -> Script:
    render = {Kind.CHAT: render_chat, Kind.COMPLETIONS: render_completion, Kind.RESPONSES: render_responses}
    return render[case.kind](case.generation, MODEL, stream=case.stream, per_chunk=case.per_chunk)


# -- the stack: a sidecar in front of the scripted server, on a loop thread ------------------


@dataclass
class Stack:
    loop: LoopThread
    upstream: ScriptedUpstream
    sidecar: Sidecar
    client: openai.OpenAI

    def sample(self, name: str, **labels: str) -> float:
        return self.sidecar.registry.get_sample_value(name, labels) or 0.0

    def requests(self) -> float:
        return sum(
            s.value
            for metric in self.sidecar.registry.collect()
            if metric.name == "tokenscaler_requests"
            for s in metric.samples
            if s.name == "tokenscaler_requests_total"
        )

    def send(self, case: Case, script: Script) -> None:
        key = str(next(_ids))
        self.upstream.scripts[key] = script
        before = self.requests()
        request = {**case.request, "extra_headers": {"X-Script": key}}
        if case.kind is Kind.CHAT:
            out: Any = self.client.chat.completions.create(**request)
        elif case.kind is Kind.COMPLETIONS:
            out = self.client.completions.create(**request)
        else:
            request.pop("stop", None)
            out = self.client.responses.create(**request)
        if case.stream:
            for _ in out:
                pass
        deadline = time.monotonic() + 10
        while self.requests() == before:  # the sidecar settles just after the last byte
            assert time.monotonic() < deadline, "the sidecar never settled the request"
            time.sleep(0.002)


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    loop = LoopThread()
    upstream = ScriptedUpstream()
    workload = f"test-{uuid.uuid4().hex[:10]}/bounds"
    url = loop.run(upstream.start())
    config = SidecarConfig(
        workload=workload,
        redis_url=redis_url,
        upstream=url,
        host="127.0.0.1",
        port=0,
        admin_port=0,
        shutdown_delay_s=0.0,
        drain_timeout_s=5.0,
        flush_interval_s=3600.0,
        sidecar_id="bounds-0",
    )
    sidecar = Sidecar(config, CollectorRegistry())

    async def start() -> None:
        await sidecar.start()

    loop.run(start())
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sidecar.port}/v1", api_key="k", max_retries=0)
    try:
        yield Stack(loop, upstream, sidecar, client)
    finally:
        client.close()
        loop.run(sidecar.stop())
        loop.run(upstream.stop())
        loop.close()
        delete_keys(redis_url, f"{KEY_PREFIX}:{{{workload}}}*")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cases())
def test_honest_usage_is_never_altered(stack: Stack, case: Case) -> None:
    before = {
        t: stack.sample("tokenscaler_tokens_total", type=t, model=MODEL, tenant="none")
        for t in ("prompt", "generation")
    }
    implausible = sum(
        stack.sample("tokenscaler_usage_implausible_total", field=f) for f in ("prompt", "generation")
    )
    stack.send(case, script_of(case))
    after = {
        t: stack.sample("tokenscaler_tokens_total", type=t, model=MODEL, tenant="none")
        for t in ("prompt", "generation")
    }
    g = case.generation
    assert after["prompt"] - before["prompt"] == g.prompt_tokens
    assert after["generation"] - before["generation"] == g.completion_tokens()
    assert implausible == sum(
        stack.sample("tokenscaler_usage_implausible_total", field=f) for f in ("prompt", "generation")
    )


# -- implausible usage ------------------------------------------------------------------------

HUGE = 10**15


def lying(case: Case, **usage: Any) -> Script:
    """The case's honest script with its usage overwritten."""
    script = script_of(case)
    holder = script.json_body if script.json_body is not None else script.usage_event
    assert holder is not None
    doc = holder.get("response", holder) if case.kind is Kind.RESPONSES else holder
    doc["usage"].update(usage)
    return script


def simple(kind: Kind, stream: bool, **request: Any) -> Case:
    text = "Hello wörld, 中文 " * 4
    choice = Choice(content=[text[i : i + 2] for i in range(0, len(text), 2)], silent=1)
    generation = Generation([choice], 0, [], 12)
    base: dict[str, Any] = {"model": "liar", "stream": stream}
    if kind is Kind.CHAT:
        base["messages"] = [{"role": "user", "content": "hi"}]
    elif kind is Kind.RESPONSES:
        base["input"] = "hi"
    else:
        base["prompt"] = "hi"
    return Case(kind, stream, 2, generation, {**base, **request})


def counted(stack: Stack, model: str) -> tuple[float, float]:
    return (
        stack.sample("tokenscaler_tokens_total", type="prompt", model=model, tenant="none"),
        stack.sample("tokenscaler_tokens_total", type="generation", model=model, tenant="none"),
    )


@pytest.mark.parametrize("kind", [Kind.CHAT, Kind.COMPLETIONS, Kind.RESPONSES])
@pytest.mark.parametrize("stream", [False, True])
def test_a_huge_count_is_replaced_by_the_sidecars_own(
    stack: Stack, kind: Kind, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = f"liar-{kind.value}-{stream}"
    case = simple(kind, stream, model=model)
    key = "output_tokens" if kind is Kind.RESPONSES else "completion_tokens"
    flagged = stack.sample("tokenscaler_usage_implausible_total", field="generation")
    with caplog.at_level(logging.WARNING, logger="sidecar.usage_bounds"):
        stack.send(case, lying(case, **{key: HUGE}))
        stack.send(case, lying(case, **{key: HUGE}))
    prompt, generation = counted(stack, model)
    assert prompt == 2 * 12  # the honest field is kept
    # the sidecar's own count: one token per streamed piece, else the text by characters / 4
    text = "".join(case.generation.choices[0].content)
    pieces = len(range(0, len(case.generation.choices[0].content), 2))
    own = pieces if stream else max(1, round(len(text) / 4))
    assert 0 < generation <= 2 * (len(text.encode()) + 2000)
    assert generation == pytest.approx(2 * own, abs=2)
    assert stack.sample("tokenscaler_usage_implausible_total", field="generation") == flagged + 2
    lines = [r.getMessage() for r in caplog.records if model in r.getMessage()]
    assert len(lines) == 1 and str(HUGE) in lines[0] and "implausible" in lines[0]


def test_a_huge_prompt_and_hidden_reasoning_are_bounded(stack: Stack) -> None:
    case = simple(Kind.CHAT, False, model="liar-prompt", max_completion_tokens=40)
    stack.send(case, lying(case, prompt_tokens=HUGE, completion_tokens=HUGE))
    prompt, generation = counted(stack, "liar-prompt")
    assert 0 < prompt < 100  # the prompt estimate of "hi"
    assert 0 < generation <= 40 + SPECIAL_TOKENS_PER_CHOICE
    # hidden reasoning inside max_completion_tokens is honest: kept
    case = simple(Kind.CHAT, False, model="reasoner", max_completion_tokens=400)
    script = lying(case, completion_tokens=350, completion_tokens_details={"reasoning_tokens": 340})
    stack.send(case, script)
    assert counted(stack, "reasoner") == (12, 350)


def test_usage_of_reads_hidden_reasoning() -> None:
    chat = {"prompt_tokens": 1, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 7}}
    assert usage_of(Kind.CHAT, chat) == Usage(1, 9, 7)
    responses = {"input_tokens": 1, "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 8}}
    assert usage_of(Kind.RESPONSES, responses) == Usage(1, 9, 8)
    assert usage_of(Kind.CHAT, {"prompt_tokens": 1, "completion_tokens": 2}) == Usage(1, 2, 0)


async def test_budgets_settle_the_bounded_value(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, redis_url: str
) -> None:
    upstream = ScriptedUpstream()
    url = await upstream.start()
    write_policy(
        policy_file, {"scope": scope(workload), "defaults": {"budget": {"daily": 10**9, "monthly": 10**10}}}
    )
    sidecar = await start_sidecar(policy=policy_file, upstream=url)
    case = simple(Kind.CHAT, False, model="liar", max_tokens=30)
    upstream.scripts["b"] = lying(case, completion_tokens=HUGE)
    try:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{sidecar.port}/v1", api_key="k", max_retries=0
        ) as client:
            request = {k: v for k, v in case.request.items() if k != "stream"}
            await client.chat.completions.create(
                **request, extra_headers={"X-Script": "b", "X-Tenant-ID": "acme"}
            )
        await settled(sidecar)
    finally:
        await upstream.stop()
    charged = used(redis_url, workload, "acme")
    assert 12 < charged <= 12 + 30 + SPECIAL_TOKENS_PER_CHOICE
    assert (
        sidecar.registry.get_sample_value("tokenscaler_usage_implausible_total", {"field": "generation"}) == 1
    )


def test_a_stream_whose_only_text_is_in_its_last_event_is_honest(stack: Stack) -> None:
    # a Responses API server that streams no deltas: the text arrives with the usage
    case = simple(Kind.RESPONSES, True, model="no-deltas")
    case.generation.choices[0].content = ["a"] * 1000  # more tokens than any other event's bytes
    tokens = 1000 + 1
    script = script_of(case)
    script.events = [event for event in script.events if not event["type"].endswith(".delta")]
    script.events = [event for event in script.events if event["type"] != "response.output_text.done"]
    stack.send(case, script)
    assert counted(stack, "no-deltas") == (12, tokens)
