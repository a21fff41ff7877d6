"""Strict request fields and path normalisation (pure)."""

from __future__ import annotations

import json

from hypothesis import assume, given
from hypothesis import strategies as st

from sidecar import jsonbody, openai, paths, request_rules
from sidecar.openai import Kind, ParsedRequest
from sidecar.request_rules import Refusal
from tests.sidecar.test_sidecar_openai import JSON


def refusal(kind: Kind, doc: object) -> Refusal:
    result = request_rules.check(kind, json.dumps(doc).encode())
    assert isinstance(result, Refusal)
    return result


def test_refusals_name_the_field() -> None:
    assert refusal(Kind.CHAT, {"n": "500"}).param == "n"
    assert "got 500.0" in refusal(Kind.CHAT, {"n": 500.0}).message
    assert refusal(Kind.CHAT, {"stream": "true"}).param == "stream"
    options = refusal(Kind.CHAT, {"stream_options": {"include_usage": 1}})
    assert options.param == "stream_options.include_usage"
    conflict = refusal(Kind.CHAT, {"max_tokens": 10, "max_completion_tokens": 20})
    assert conflict.param == "max_tokens" and "max_completion_tokens=20" in conflict.message
    assert refusal(Kind.RESPONSES, {"max_output_tokens": 0}).param == "max_output_tokens"
    duplicate = request_rules.check(Kind.CHAT, b'{"n":1,"n":2}')
    assert isinstance(duplicate, Refusal) and duplicate.param == "n" and duplicate.code == "invalid_json"
    body = json.loads(duplicate.body())["error"]
    assert body["param"] == "n" and body["type"] == "invalid_request_error"


def test_the_agreed_limit_is_metered_whichever_field_carries_it() -> None:
    parsed = request_rules.check(Kind.COMPLETIONS, b'{"prompt":"x","max_completion_tokens":7}')
    assert isinstance(parsed, ParsedRequest) and parsed.max_tokens == 7
    parsed = request_rules.check(Kind.CHAT, b'{"messages":[],"max_tokens":7,"n_predict":7,"n":null}')
    assert isinstance(parsed, ParsedRequest) and (parsed.max_tokens, parsed.n) == (7, 1)
    # A rewrite reaches every limit field the client used.
    body = openai.rewritten(Kind.CHAT, b'{"max_tokens":7,"n_predict":7}', max_tokens=3)
    assert json.loads(body) == {"max_tokens": 3, "n_predict": 3}


@given(JSON)
def test_anything_is_metered_or_refused_never_raises(doc: object) -> None:
    for kind in Kind:
        result = request_rules.check(kind, json.dumps(doc).encode())
        assert isinstance(result, ParsedRequest | Refusal)
        if isinstance(result, ParsedRequest) and isinstance(doc, dict) and kind is not Kind.EMBEDDINGS:
            limits = {doc[k] for k in openai.LIMIT_FIELDS if doc.get(k) is not None}
            assert limits == ({result.max_tokens} if result.max_tokens is not None else set())


def test_paths_are_routed_and_forwarded_normalised() -> None:
    for raw in (
        "/v1/./chat/completions",
        "/v1/x/../chat/completions",
        "//v1//chat/completions/",
        "/v1/%2e/chat/completions",
    ):
        target = paths.route("POST", raw + "?a=%2F")
        assert (target.kind, target.forward, target.refusal) == (
            Kind.CHAT,
            "/v1/chat/completions?a=%2F",
            None,
        )
    assert paths.route("GET", "/v1/./chat/completions").kind is None
    assert paths.route("POST", "/chat/completions").kind is Kind.CHAT
    assert paths.route("POST", "/v1%2fcompletions").refusal is not None
    assert paths.route("POST", "/api/chat").refusal is not None
    assert paths.route("GET", "/api/chat").refusal is None
    assert paths.route("POST", "http://x/v1/completions").refusal is not None
    kept = paths.route("PUT", "/echo/a%2Fb/?x=1")
    assert (kept.kind, kept.forward, kept.refusal) == (None, "/echo/a%2Fb/?x=1", None)


@given(st.dictionaries(st.text(max_size=5), JSON, max_size=5), st.sampled_from([None, 1, 2]))
def test_the_top_level_layout_matches_the_standard_parse(doc: dict[str, object], indent: int | None) -> None:
    try:
        text = json.dumps(doc, indent=indent, allow_nan=False)
    except ValueError:
        assume(False)  # Infinity is not JSON: refused by design
    decoded, layout = jsonbody.decode(text)
    assert decoded == json.loads(text)
    for key, (start, end) in layout.spans.items():
        assert json.loads(text[start:end]) == doc[key]
    edited = jsonbody.edited(text.encode(), layout, {"max_tokens": 3, "model": "x"})
    assert json.loads(edited) == {**doc, "max_tokens": 3, "model": "x"}
