"""Anthropic's Messages API shapes: what is counted, cache tokens, errors, prices (pure)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from sidecar import anthropic, paths, request_rules, wires
from sidecar.openai import Chunk, Kind, Usage
from sidecar.policy import budgets, schema
from sidecar.policy.schema import MONEY, Budget, Price
from sidecar.request_rules import Refusal
from tests.sidecar.test_sidecar_openai import JSON, SHAPED

EVENTS = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-x",
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "x"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "thinking_delta", "thinking": "hm"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
]


def test_the_event_sequence_is_counted_with_its_cache_tokens() -> None:
    usage: Usage | None = None
    pieces: list[int] = []
    texts: list[str] = []
    seen: list[Usage | None] = []
    for event in EVENTS:
        chunk = anthropic.parse_chunk(Kind.MESSAGES, json.dumps(event), usage)
        assert chunk is not None
        pieces.append(chunk.pieces)
        texts.extend(chunk.texts)
        if chunk.usage is not None:
            usage = chunk.usage
            seen.append(usage)
    assert pieces == [0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    assert texts == ["Hello", '{"a', "hm"]
    # message_start: all input, one output token, not final; message_delta: final output
    assert seen == [
        Usage(2125, 1, cache_read=2000, cache_write=100, final=False),
        Usage(2125, 15, cache_read=2000, cache_write=100),
    ]


def test_message_delta_repeating_the_input_wins_and_alone_needs_the_input() -> None:
    start = anthropic.usage_of({"input_tokens": 10, "output_tokens": 1}, final=False)
    later = {"input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 9}
    assert anthropic.usage_of(later, start) == Usage(15, 9, cache_read=3)
    assert anthropic.usage_of({"output_tokens": 9, "cache_read_input_tokens": None}, start) == Usage(10, 9)
    assert anthropic.usage_of({"output_tokens": 9}) is None  # the input said nowhere
    assert anthropic.usage_of({"input_tokens": -1, "output_tokens": 2}) is None


def test_request_and_response() -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 300,
        "stream": True,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": 1}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "42"}]},
        ],
    }
    parsed = request_rules.check(Kind.MESSAGES, json.dumps(body).encode())
    assert not isinstance(parsed, Refusal)
    assert (parsed.model, parsed.stream, parsed.max_tokens, parsed.n, parsed.messages) == (
        "claude-x",
        True,
        300,
        1,
        3,
    )
    assert parsed.prompt_texts == ("be brief", "hi", '{"q": 1}', "42")
    answer = {
        "model": "claude-x",
        "content": [{"type": "text", "text": "ok"}, {"type": "tool_use", "input": {}}],
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 7, "output_tokens": 3},
    }
    complete = anthropic.parse_response(Kind.MESSAGES, json.dumps(answer).encode())
    assert complete is not None and complete.usage == Usage(12, 3, cache_read=7)
    assert complete.texts == ("ok", "{}") and complete.model == "claude-x"


def test_max_tokens_is_required_and_checked() -> None:
    refused = request_rules.check(Kind.MESSAGES, b'{"model":"m","messages":[]}')
    assert isinstance(refused, Refusal) and refused.param == "max_tokens"
    refused = request_rules.check(Kind.MESSAGES, b'{"model":"m","max_tokens":"9","messages":[]}')
    assert isinstance(refused, Refusal) and refused.param == "max_tokens"
    refused = request_rules.check(Kind.MESSAGES, b'{"max_tokens":9,"stream":"yes"}')
    assert isinstance(refused, Refusal) and refused.param == "stream"


def test_errors_are_in_anthropic_shape_by_status() -> None:
    for status, type_ in (
        (400, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
    ):
        doc = json.loads(wires.ANTHROPIC.error_body(status, "why", "tokens", "code", None))
        assert doc == {"type": "error", "error": {"type": type_, "message": "why"}}
    assert json.loads(anthropic.error_body(503, "x"))["error"]["type"] == "api_error"
    assert json.loads(anthropic.error_body(418, "x"))["error"]["type"] == "invalid_request_error"


def test_stop_events() -> None:
    error = anthropic.stop_event("error", "budget", 7)
    assert error.startswith(b"event: error\ndata: ") and error.endswith(b"\n\n")
    assert json.loads(error.split(b"data: ")[1])["error"]["type"] == "rate_limit_error"
    finish = anthropic.stop_event("finish", "budget", 7).decode().split("\n\n")
    delta = json.loads(finish[0].split("data: ")[1])
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"] == {"output_tokens": 7}
    assert finish[1] == 'event: message_stop\ndata: {"type":"message_stop"}' and finish[2] == ""


def test_paths() -> None:
    assert paths.route("POST", "/v1/messages").kind is Kind.MESSAGES
    assert paths.route("POST", "/v1/./messages").kind is Kind.MESSAGES
    count = paths.route("POST", "/v1/messages/count_tokens")
    assert count.kind is None and count.refusal is None  # passed through, not counted


def test_cache_tokens_are_priced_apart() -> None:
    policy = schema.parse(
        {
            "prices": {
                "claude-x": {
                    "per": 1_000_000,
                    "prompt": 3,
                    "generation": 15,
                    "cacheRead": 0.3,
                    "cacheWrite": 3.75,
                },
                "local": {"prompt": 0.001, "generation": 0.002},
            }
        }
    )
    price = policy.price("claude-x")
    assert price == Price(3_000_000, 15_000_000, 300_000, 3_750_000)  # billionths per 1k tokens
    money = Budget(unit=MONEY, daily=10**12)
    # 1M input of which 400k read and 100k written, 10k output: $1.5 + $0.12 + $0.375 + $0.15
    cost = budgets.cost(money, price, 1_000_000, 10_000, (400_000, 100_000))
    assert cost == 2_145_000_000
    # a reservation does not know the split: the dearest input price
    assert budgets.cost(money, price, 1_000_000, 0) == 3_750_000_000
    # no cache prices: cached input at the input price
    assert budgets.cost(money, policy.price("local"), 1000, 0, (500, 0)) == 1_000_000
    assert budgets.cost(Budget(), price, 1000, 10, (500, 100)) == 1010  # a token budget counts tokens


def test_bad_prices_name_the_key() -> None:
    for raw, where in (
        ({"per": 1000000, "prompt": 3}, "prices.m.generation"),
        ({"per": 10, "prompt": 3, "generation": 3}, "prices.m.per"),
        ({"prompt": 3, "generation": 3, "cacheRead": "cheap"}, "prices.m.cacheRead"),
    ):
        try:
            schema.parse({"prices": {"m": raw}})
        except Exception as exc:
            assert where in str(exc)
        else:
            raise AssertionError(f"{raw} was accepted")


@given(st.one_of(JSON, SHAPED).map(lambda doc: json.dumps(doc)) | st.text(max_size=30))
def test_bad_input_never_raises(data: str) -> None:
    chunk = anthropic.parse_chunk(Kind.MESSAGES, data, Usage(3, 1, final=False))
    assert chunk is None or isinstance(chunk, Chunk)
    anthropic.parse_response(Kind.MESSAGES, data.encode())
    parsed = request_rules.check(Kind.MESSAGES, data.encode())
    assert isinstance(parsed, Refusal) or parsed.kind is Kind.MESSAGES


def test_the_example_price_file_is_a_valid_policy() -> None:
    example = Path(__file__).parents[2] / "docs" / "examples" / "hosted-prices.yaml"
    assert "not checked against those pages" in example.read_text()  # says what the figures are
    policy = schema.load(example)
    assert policy.price("claude-sonnet-4-5") == Price(3_000_000, 15_000_000, 300_000, 3_750_000)
    assert policy.defaults.budget.unit == MONEY
