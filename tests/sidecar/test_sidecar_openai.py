"""Request and response shapes: what is counted, and that bad input never raises."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from sidecar import openai
from sidecar.openai import Chunk, Kind, Usage

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["choices", "usage", "delta", "text", "content", "prompt_tokens", "type", "response"])
SHAPED = st.recursive(
    st.none() | st.integers(min_value=-2, max_value=50) | st.text(max_size=4) | st.booleans(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=25,
)


def test_chat_request() -> None:
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
            ],
            "max_completion_tokens": 20,
            "max_tokens": 5,
            "n": 3,
            "stream": True,
        }
    ).encode()
    parsed = openai.parse_request(Kind.CHAT, body)
    assert parsed is not None
    assert (parsed.model, parsed.stream, parsed.max_tokens, parsed.n) == ("m", True, 20, 3)
    assert parsed.prompt_texts == ("be brief", "hi") and parsed.messages == 2
    assert not parsed.wants_usage


def test_completions_and_embeddings_token_ids() -> None:
    parsed = openai.parse_request(Kind.COMPLETIONS, b'{"prompt": [[1,2,3],[4]], "max_tokens": 0}')
    assert (
        parsed is not None and parsed.prompt_ids == 4 and parsed.max_tokens is None and parsed.model is None
    )
    parsed = openai.parse_request(Kind.EMBEDDINGS, b'{"model":"e","input":["a","b"],"stream":true}')
    assert parsed is not None and parsed.prompt_texts == ("a", "b") and not parsed.stream


def test_not_an_object_is_not_parsed() -> None:
    for body in (b"", b"not json", b"[1]", b'"s"', b"\xff"):
        assert openai.parse_request(Kind.CHAT, body) is None


def test_usage_is_asked_for_without_touching_the_rest() -> None:
    body = b'  {"model":"m","stream":true,"messages":[{"content":"\\u00e9"}]}'
    asked = openai.with_usage_requested(body)
    option = b'"stream_options":{"include_usage":true},'
    assert asked == b"  {" + option + body[3:]
    assert json.loads(asked)["stream_options"] == {"include_usage": True}
    merged = openai.with_usage_requested(b'{"stream_options":{"include_usage":false,"x":1},"stream":true}')
    assert merged is not None and json.loads(merged)["stream_options"] == {"include_usage": True, "x": 1}
    assert openai.with_usage_requested(b'{"stream_options":"bad"}') is None


def test_null_usage_is_stripped_exactly() -> None:
    assert openai.strip_null_usage(b'data: {"id":"x","usage":null}\n\n') == b'data: {"id":"x"}\n\n'
    assert openai.strip_null_usage(b'data: {"usage": null, "id": "x"}\n\n') == b'data: {"id": "x"}\n\n'
    assert openai.strip_null_usage(b'data: {"id": "x", "usage": null}\n\n') == b'data: {"id": "x"}\n\n'


def test_chunks() -> None:
    chunk = openai.parse_chunk(
        Kind.CHAT,
        '{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"tool_calls":'
        '[{"function":{"arguments":"{}"}}]}},{"index":2,"delta":{"content":""}}],"usage":null}',
    )
    assert chunk == Chunk(pieces=2, texts=("a", "{}"), null_usage=True)
    usage = openai.parse_chunk(Kind.CHAT, '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}')
    assert usage == Chunk(usage=Usage(3, 4), usage_only=True)
    assert openai.parse_chunk(Kind.COMPLETIONS, '{"choices":[{"text":"x"}]}') == Chunk(1, ("x",))
    assert openai.parse_chunk(Kind.CHAT, "[DONE]") == openai.DONE
    assert openai.parse_chunk(Kind.CHAT, "{not json") is None
    assert openai.parse_chunk(Kind.CHAT, '{"error":{"message":"x"}}') == Chunk()
    done = '{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":6}}}'
    assert openai.parse_chunk(Kind.RESPONSES, done) == Chunk(usage=Usage(5, 6))
    delta = '{"type":"response.output_text.delta","delta":"hi"}'
    assert openai.parse_chunk(Kind.RESPONSES, delta) == Chunk(1, ("hi",))


def test_usage_shapes() -> None:
    assert openai.usage_of(Kind.CHAT, {"prompt_tokens": 1, "completion_tokens": 2}) == Usage(1, 2)
    assert openai.usage_of(Kind.CHAT, {"prompt_tokens": 1, "total_tokens": 5}) == Usage(1, 4)
    assert openai.usage_of(Kind.EMBEDDINGS, {"prompt_tokens": 9, "total_tokens": 9}) == Usage(9, 0)
    assert openai.usage_of(Kind.CHAT, {"prompt_tokens": True, "completion_tokens": 2}) is None
    assert openai.usage_of(Kind.CHAT, {"prompt_tokens": -1, "completion_tokens": 2}) is None
    assert openai.usage_of(Kind.CHAT, {"prompt_tokens": 1.5, "completion_tokens": 2}) is None


def test_complete_response() -> None:
    body = b'{"model":"m","choices":[{"message":{"content":"ab"}},{"message":{"content":"c"}}],"usage":null}'
    parsed = openai.parse_response(Kind.CHAT, body)
    assert parsed is not None and parsed.texts == ("ab", "c") and parsed.usage is None and parsed.model == "m"


@given(st.sampled_from(list(Kind)), JSON | SHAPED)
def test_fuzz_never_raises(kind: Kind, doc: object) -> None:
    text = json.dumps(doc)
    chunk = openai.parse_chunk(kind, text)
    if chunk is not None:
        assert chunk.pieces >= 0
        if chunk.usage is not None:
            assert chunk.usage.prompt >= 0 and chunk.usage.generation >= 0
    openai.parse_response(kind, text.encode())
    parsed = openai.parse_request(kind, text.encode())
    if parsed is not None:
        assert parsed.n >= 1 and parsed.prompt_ids >= 0
        openai.with_usage_requested(text.encode())


@given(st.binary(max_size=200))
def test_fuzz_bytes_never_raise(data: bytes) -> None:
    for kind in Kind:
        openai.parse_request(kind, data)
        openai.parse_response(kind, data)
        openai.parse_chunk(kind, data.decode("utf-8", "replace"))
    openai.strip_null_usage(data)
