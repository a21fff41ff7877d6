"""Every option of every ``token-scaler`` command has help text.

Each command's ``main`` builds its parser; parsing is stopped before it starts, so the test sees
the parser a user's ``--help`` would print, subcommands included, without running the command.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import pytest

from token_scaler.cli import COMMANDS


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _stop(self: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> NoReturn:
    raise _Built(self)


def built_parser(module_name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, taken at its first parse."""
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", _stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_intermixed_args", _stop)
    main = importlib.import_module(module_name).main
    with pytest.raises(_Built) as built:
        main([])
    return built.value.parser


def options(parser: argparse.ArgumentParser, prog: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every option and positional of ``parser`` and of its subcommands, named as a user types it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{prog} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield f"{prog} {'/'.join(action.option_strings) or action.dest}", action


def without_help(actions: Sequence[tuple[str, argparse.Action]]) -> list[str]:
    return [name for name, action in actions if action.help is None or not str(action.help).strip()]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = built_parser(COMMANDS[command][0], monkeypatch)
    found = list(options(parser, f"token-scaler {command}"))
    assert found, f"token-scaler {command}: no options found"
    assert without_help(found) == []


def test_an_option_without_help_is_named() -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--said", help="what it does")
    sub = parser.add_subparsers().add_parser("sub")
    sub.add_argument("--mute")
    assert without_help(list(options(parser, "x"))) == ["x sub --mute"]
