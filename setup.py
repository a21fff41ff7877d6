"""Compiles the modules ``token_scaler.native.COMPILED`` names with mypyc, where it can.

Everything else about the package is in pyproject.toml. Without a C compiler (or with
TOKEN_SCALER_COMPILE=0) the package installs as plain Python, which behaves the same, slower.
After a successful build the SHA-256 of each compiled source goes to
token_scaler/native-sources.json: ``token_scaler.native`` runs the compiled modules only
while their sources still match.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup  # type: ignore[import-untyped]
from setuptools.command.build_ext import build_ext  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from token_scaler.native import COMPILED, SOURCES_FILE, digest, source_path  # noqa: E402


def source(module: str) -> str:
    return str(source_path(module, HERE).relative_to(HERE))


def say(message: str) -> None:
    print(f"token-scaler setup: {message}", file=sys.stderr)


# The commands that build the package; pip also runs setup.py for its metadata alone
# (egg_info, dist_info), which needs no extensions and would pay for mypyc each time.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def extensions() -> list[Any]:
    if not BUILDS & set(sys.argv[1:]):
        return []
    if os.environ.get("TOKEN_SCALER_COMPILE", "1") == "0":
        say("TOKEN_SCALER_COMPILE=0: installing the simulator's modules as plain Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        say("mypyc is not importable: installing the simulator's modules as plain Python")
        return []
    try:
        modules: list[Any] = mypycify(
            ["--ignore-missing-imports", *(source(m) for m in COMPILED)], group_name="token_scaler_native"
        )
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error it cannot compile
        say(f"mypyc could not compile ({exc!r}): installing plain Python")
        return []
    return modules


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """Builds the compiled modules, or leaves the plain Python ones when the compiler fails;
    records the sources it compiled."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers, a compiler error
            say(f"compiling failed ({exc}): installing plain Python")
            return
        digests = {m: digest(source_path(m, HERE)) for m in COMPILED}
        targets = {HERE / "token_scaler" / SOURCES_FILE} if self.inplace else set()
        targets.add(Path(self.build_lib) / "token_scaler" / SOURCES_FILE)
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(digests, indent=1) + "\n")


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
