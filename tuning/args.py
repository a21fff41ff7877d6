"""argparse types built on ``token_scaler.config``'s parsers, so a bad flag names the flag and
says what is allowed, the way the services' settings do."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from token_scaler import config

T = TypeVar("T")


def arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(raw: str) -> T:
        try:
            return parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None

    convert.__name__ = parse.__name__
    return convert


def listed(parse: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A comma-separated list of values."""

    def convert(raw: str) -> list[T]:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [parse(item) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None

    convert.__name__ = f"list of {parse.__name__}"
    return convert


def key_value(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{raw!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def non_negative_int(raw: str) -> int:
    value = config.integer(raw)
    if value < 0:
        raise ValueError("expected a whole number of 0 or more")
    return value


def fraction(raw: str) -> float:
    value = config.non_negative_float(raw)
    if value > 1:
        raise ValueError("expected a number from 0 to 1")
    return value


positive_float = arg(config.positive_float)
non_negative_float = arg(config.non_negative_float)
positive_int = arg(config.positive_int)
