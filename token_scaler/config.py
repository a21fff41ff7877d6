"""Settings from flags and environment variables, validated at start-up.

Each component declares its settings once as a mapping of ``Option``s; ``load``
resolves every option (flag, then env variable, then default), parses it, and
raises ``ConfigError`` naming the flag or variable that holds a bad value. The
component's config dataclass is then built from the result, so a bad value
never gets past start-up.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse

from token_scaler.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Option(Generic[T]):
    flag: str
    env: str
    parse: Callable[[str], T]
    default: T | None
    help: str
    required: bool = False
    # The flag may be given more than once; its values reach ``parse`` joined by ``;``.
    repeatable: bool = False


def load(
    options: Mapping[str, Option[Any]],
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str,
    description: str,
) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, opt in options.items():
        shown = "required" if opt.required else f"default: {opt.default}"
        parser.add_argument(
            opt.flag,
            dest=name,
            default=None,
            action="append" if opt.repeatable else "store",
            help=f"{opt.help} (env {opt.env}; {shown})",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for name, opt in options.items():
        raw = getattr(args, name)
        if isinstance(raw, list):
            raw = ";".join(raw)
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None or raw == "":
            if opt.required:
                raise ConfigError(f"{opt.flag} (env {opt.env}) is required: {opt.help}")
            values[name] = opt.default
            continue
        try:
            values[name] = opt.parse(raw)
        except ValueError as exc:
            shown = _redacted(raw) if opt.parse is redis_url else raw
            raise ConfigError(f"{source}={shown!r} is invalid: {exc}") from exc
    return values


# Parsers: each raises ValueError saying what is allowed.


def port(raw: str) -> int:
    value = integer(raw)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number from 0 to 65535 (0 picks a free port)")
    return value


def integer(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a finite number above 0")
    return value


def non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a finite number of 0 or more")
    return value


def positive_int(raw: str) -> int:
    value = integer(raw)
    if value <= 0:
        raise ValueError("expected a whole number above 0")
    return value


def non_negative_int(raw: str) -> int:
    value = integer(raw)
    if value < 0:
        raise ValueError("expected a whole number of 0 or more")
    return value


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def text(raw: str) -> str:
    return raw


def existing_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError("no such file")
    return path


def redis_url(raw: str) -> str:
    """One Redis, a Redis Cluster or a Sentinel set (``redis_conn.locate`` reads every form)."""
    from token_scaler.redis_conn import RedisUrlError, locate

    try:
        locate(raw)
    except RedisUrlError as exc:
        raise ValueError(exc.reason) from None
    return raw


def _redacted(url: str) -> str:
    from token_scaler.redis_conn import redact

    return redact(url)


def redis_url_argument(raw: str) -> str:
    """``redis_url`` for argparse: its error names the URL (password hidden) and what is wrong."""
    import argparse

    try:
        return redis_url(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{_redacted(raw)!r} is invalid: {exc}") from None


def http_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return raw.rstrip("/")


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; ``ConfigError`` names the file (``what`` it is) when unreadable or malformed."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def workload_name(raw: str) -> str:
    from token_scaler.record import validate_workload

    return validate_workload(raw)
