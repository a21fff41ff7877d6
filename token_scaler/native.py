"""The modules ``pip install`` compiles with mypyc, and which of them runs.

The simulator's event loop, replica model and HPA (``tuning.engine``, ``tuning.replica``,
``tuning.hpa``) and the scaler's per-second series (``scaler.series``) are plain typed Python;
``setup.py`` compiles them to C extensions where a C compiler is present (``bench/sim_speed.py``
measures what that gains) and otherwise installs them as they are. A compiled module sits beside
its source and Python imports it first, so the build records the SHA-256 of each source it
compiled (``SOURCES_FILE``). When a source no longer matches (an editable install whose code was
edited since), or ``TOKEN_SCALER_NATIVE=0`` asks for it, all of them run from source: the group
is compiled together and calls itself natively, so it is used whole or not at all. An extension
of a module the group does not name (a build of another version left it) never runs. ``tuning``
and ``scaler`` call ``use_source_if_stale`` before any of their modules loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

# In the order they import one another.
COMPILED = ("scaler.series", "tuning.replica", "tuning.hpa", "tuning.engine")
SOURCES_FILE = "native-sources.json"  # beside this module, written by setup.py's build
ROOT = Path(__file__).resolve().parent.parent
SWITCH = "TOKEN_SCALER_NATIVE"

_decided: bool | None = None  # compiled_in_use's answer, once decided


def by_value(obj: Any) -> tuple[type[Any], tuple[Any, ...]]:
    """``__reduce__`` of a frozen dataclass among the compiled modules: pickled as its
    constructor's arguments (``simulate --jobs`` sends settings to worker processes), since a
    compiled frozen dataclass cannot be restored field by field."""
    return type(obj), tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_path(module: str, root: Path = ROOT) -> Path | None:
    """The extension module this interpreter would import for ``module`` (one built for it,
    beside the source), None if there is none."""
    source = source_path(module, root)
    for suffix in EXTENSION_SUFFIXES:
        found = source.with_name(source.stem + suffix)
        if found.exists():
            return found
    return None


def stale(root: Path = ROOT) -> list[str]:
    """Why the compiled modules under ``root`` cannot run (empty: they can): a module not
    compiled, or a source that differs from the one compiled."""
    recorded_file = root / "token_scaler" / SOURCES_FILE
    try:
        recorded = json.loads(recorded_file.read_text())
    except (OSError, ValueError):
        return [f"no {recorded_file.name}: nothing was compiled"]
    reasons = []
    for module in COMPILED:
        if compiled_path(module, root) is None:
            reasons.append(f"{module}: not compiled")
        elif recorded.get(module) != digest(source_path(module, root)):
            reasons.append(f"{module}: its source changed after it was compiled")
    return reasons


def sources_asked_for() -> bool:
    """Whether ``TOKEN_SCALER_NATIVE=0`` asks to run the compiled modules from source."""
    return os.environ.get(SWITCH, "1") == "0"


def compiled_in_use() -> bool:
    """Whether this process runs the compiled modules (decided at the first call)."""
    global _decided
    if _decided is None:
        _decided = not sources_asked_for() and not stale()
    return _decided


def source_note(root: Path = ROOT) -> str | None:
    """A line telling a user that the compiled modules under ``root`` cannot run and how to
    build them; None when they can, or when ``TOKEN_SCALER_NATIVE=0`` asked for the sources."""
    if sources_asked_for():
        return None
    reasons = stale(root)
    if not reasons:
        return None
    return (
        f"the simulator runs from source, 1.6 to 1.8x slower ({'; '.join(reasons)}); where a C "
        "compiler is present, `python setup.py build_ext --inplace` in a checkout, or reinstalling "
        "the package, compiles it"
    )


def strays(package: str, root: Path = ROOT) -> list[str]:
    """Modules of ``package`` that this interpreter would import from an extension although
    ``COMPILED`` does not name them (a build of another version left it): they always run
    from source."""
    found = []
    for source in sorted((root / package).glob("*.py")):
        module = f"{package}.{source.stem}"
        if module not in COMPILED and compiled_path(module, root) is not None:
            found.append(module)
    return found


def use_source_if_stale(package: str) -> None:
    """Load from source, before anything imports them, ``package``'s strays, and its modules
    of the group when the group cannot run compiled (see the module docstring)."""
    modules = strays(package)
    if not compiled_in_use():
        modules += [m for m in COMPILED if m.rpartition(".")[0] == package and compiled_path(m)]
    for module in modules:
        if module not in sys.modules:
            _load_source(module)


def _load_source(module: str) -> None:
    spec = importlib.util.spec_from_file_location(module, source_path(module))
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[module]
        raise
    package, _, name = module.rpartition(".")
    setattr(sys.modules[package], name, loaded)
