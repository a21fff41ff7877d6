"""Counting without usage: a real tokenizer.json built here, and the text-length estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.openai import Kind, parse_request
from sidecar.tokens import LengthEstimate, Tokenizer, load_counter, prompt_tokens
from tests.sidecar.conftest import StartSidecar, read_records, totals
from token_scaler.errors import ConfigError

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture
def tokenizer_json(tmp_path: Path) -> Path:
    """A word-level tokenizer: every whitespace-separated word is one token."""
    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(100)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_tokenizer_counts(tokenizer_json: Path) -> None:
    counter = load_counter(tokenizer_json)
    assert isinstance(counter, Tokenizer)
    assert counter.count("t1 t2 unknown-word t3") == 4
    assert counter.count("") == 0
    request = parse_request(Kind.CHAT, b'{"messages":[{"content":"a b"},{"content":"c"}]}')
    assert request is not None
    assert prompt_tokens(counter, request) == 3 + 2 * 4


def test_length_estimate() -> None:
    assert isinstance(load_counter(None), LengthEstimate)
    assert LengthEstimate().count("abcdefghi") == 3


def test_bad_tokenizer_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        Tokenizer(bad)


async def test_server_without_usage_counted_by_tokenizer(
    start_sidecar: StartSidecar, tokenizer_json: Path, redis_url: str, workload: str
) -> None:
    import aiohttp

    sidecar = await start_sidecar(tokenizer=tokenizer_json)
    body = {"model": "m", "messages": [{"content": "t1 t2"}], "max_tokens": 9, "stream": True}
    headers = {"X-Fake-Usage": "0", "X-Fake-Per-Chunk": "4"}  # 3 chunks carry 9 tokens
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{sidecar.port}/v1/chat/completions"
        async with session.post(url, json=body, headers=headers) as response:
            await response.read()
        async with session.post(url, json={**body, "stream": False}, headers=headers) as response:
            await response.read()
    sidecar.flusher.cut()
    assert await sidecar.flusher.deliver()
    got = totals(read_records(redis_url, workload))
    assert got["sg"] == got["ag"] == 18
    assert got["sp"] == got["ap"] == 2 * (2 + 4)
    labels = {"type": "generation", "model": "m", "tenant": "none", "method": "tokenizer"}
    assert sidecar.registry.get_sample_value("tokenscaler_estimated_tokens_total", labels) == 18
