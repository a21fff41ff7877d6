"""Token counts without the server's ``usage``: a tokenizer when configured, else text length.

Used for the arrival estimates (always) and as the fallback count of a request whose
server reported no usage (then the metrics mark the counts as estimated). ``tokenizers``
is imported only when a ``tokenizer.json`` is configured, so the sidecar runs without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from sidecar.openai import ParsedRequest
from token_scaler.errors import ConfigError

# Roughly what a chat template adds around each message (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 4
# English text averages about four characters per token in BPE vocabularies.
CHARS_PER_TOKEN = 4


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class LengthEstimate:
    """ceil(characters / 4): no dependency, within a factor of ~2 for most text."""

    name = "length"

    def count(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)


class Tokenizer:
    """A Hugging Face ``tokenizer.json``, without special tokens or chat template."""

    name = "tokenizer"

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as exc:
            raise ConfigError(
                f"a tokenizer file is configured ({path}) but the 'tokenizers' package is not installed"
            ) from exc
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise ConfigError(f"cannot load tokenizer {path}: {exc}") from exc

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def load_counter(path: Path | None) -> TokenCounter:
    return Tokenizer(path) if path is not None else LengthEstimate()


def count_texts(counter: TokenCounter, texts: Iterable[str]) -> int:
    return sum(counter.count(text) for text in texts)


def prompt_tokens(counter: TokenCounter, request: ParsedRequest) -> int:
    return (
        count_texts(counter, request.prompt_texts)
        + request.prompt_ids
        + MESSAGE_OVERHEAD_TOKENS * request.messages
    )
