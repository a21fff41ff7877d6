"""Which of the modules setup.py compiles runs: compiled while their sources match what was
compiled, from source otherwise (``token_scaler.native``)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from token_scaler import native

PACKAGES = ("token_scaler", "scaler", "tuning", "sidecar")
WHERE = "import scaler.window, tuning.engine, tuning.replica as r; print(tuning.engine.__file__, r.__file__)"


def fake_tree(root: Path, compiled: bool = True) -> None:
    """Sources of the compiled modules, extension files beside them, and the digests."""
    digests = {}
    for module in native.COMPILED:
        source = native.source_path(module, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {module}\n")
        digests[module] = native.digest(source)
        if compiled:
            source.with_name(source.stem + EXTENSION_SUFFIXES[0]).write_bytes(b"")
    (root / "token_scaler").mkdir(exist_ok=True)
    (root / "token_scaler" / native.SOURCES_FILE).write_text(json.dumps(digests))


def test_matching_sources_run_compiled(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    assert native.stale(tmp_path) == []


def test_an_edited_source_sends_the_group_to_source(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    with native.source_path("tuning.replica", tmp_path).open("a") as f:
        f.write("# edited\n")
    assert native.stale(tmp_path) == ["tuning.replica: its source changed after it was compiled"]


def test_a_module_not_compiled_or_no_digests(tmp_path: Path) -> None:
    fake_tree(tmp_path, compiled=False)
    assert native.stale(tmp_path) == [f"{m}: not compiled" for m in native.COMPILED]
    (tmp_path / "token_scaler" / native.SOURCES_FILE).unlink()
    assert native.stale(tmp_path) == [f"no {native.SOURCES_FILE}: nothing was compiled"]


def where(env: dict[str, str], cwd: Path | None = None) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-c", WHERE], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return [Path(p).name for p in run.stdout.split()]


compiled_here = pytest.mark.skipif(
    not native.compiled_in_use(),
    reason=f"the modules are not compiled here: {'; '.join(native.stale()) or native.SWITCH + '=0'}",
)


@compiled_here
def test_the_switch_runs_the_sources() -> None:
    assert all(name.endswith((".so", ".pyd")) for name in where({}))
    assert where({native.SWITCH: "0"}) == ["engine.py", "replica.py"]


@compiled_here
def test_an_edited_copy_runs_from_source_and_the_same_copy_unedited_compiled(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(
            native.ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for lib in native.ROOT.glob("token_scaler_native__mypyc.*"):
        shutil.copy(lib, tmp_path)
    # an extension of a module outside the group (not even a library here) is never imported
    (tmp_path / "scaler" / f"window{EXTENSION_SUFFIXES[0]}").write_bytes(b"not a library")
    env = {"PYTHONPATH": str(tmp_path), native.SWITCH: "1"}
    assert all(name.endswith((".so", ".pyd")) for name in where(env, tmp_path))
    with native.source_path("tuning.replica", tmp_path).open("a") as f:
        f.write("# edited\n")
    assert where(env, tmp_path) == ["engine.py", "replica.py"]


def test_what_worker_processes_receive_pickles_by_value() -> None:
    """``simulate --jobs`` sends its settings to worker processes: compiled frozen dataclasses
    must come back equal (they are rebuilt through their constructors)."""
    from tuning.engine import SimConfig
    from tuning.hpa import HpaSettings
    from tuning.replica import ReplicaProfile

    config = SimConfig(ReplicaProfile(cold_start_s=30.0), HpaSettings(min_replicas=0), routing="least-tokens")
    assert pickle.loads(pickle.dumps(config)) == config


def test_an_extension_the_group_does_not_name_is_a_stray(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    (tmp_path / "scaler" / "window.py").write_text("")
    (tmp_path / "scaler" / f"window{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    (tmp_path / "scaler" / f"gone{EXTENSION_SUFFIXES[0]}").write_bytes(b"")  # no source
    (tmp_path / "scaler" / "size.py").write_text("")
    (tmp_path / "scaler" / "size.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")  # not for this Python
    assert native.strays("scaler", tmp_path) == ["scaler.window"]
    assert native.strays("tuning", tmp_path) == []
    assert native.stale(tmp_path) == []


def test_a_user_is_told_when_the_simulator_runs_from_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(native.SWITCH, raising=False)
    fake_tree(tmp_path)
    assert native.source_note(tmp_path) is None
    (tmp_path / "token_scaler" / native.SOURCES_FILE).unlink()
    note = native.source_note(tmp_path)
    assert note is not None
    assert f"no {native.SOURCES_FILE}: nothing was compiled" in note
    assert "python setup.py build_ext --inplace" in note
    monkeypatch.setenv(native.SWITCH, "0")  # asked for: nothing to tell
    assert native.source_note(tmp_path) is None
