"""The Dockerfile's promises, read statically (scripts/build-image builds and runs the image)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# Instructions with their continuation lines joined, comments dropped.
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [i.split(None, 1)[1] for i in INSTRUCTIONS if i.split(None, 1)[0].upper() == keyword]


def test_every_package_reaches_the_build_context() -> None:
    """.dockerignore is an allowlist: a package pyproject.toml ships must be on it."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    allowed = {
        line.strip()[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    missing = [p.rstrip("*") for p in include if p.rstrip("*") not in allowed]
    assert not missing, f".dockerignore leaves out {missing}"
    assert "pyproject.toml" in allowed


def test_both_stages_use_the_base_image_argument() -> None:
    assert INSTRUCTIONS[0].startswith("ARG BASE_IMAGE=")
    froms = instructions("FROM")
    assert len(froms) == 2 and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)


def test_runtime_stage_is_non_root_and_read_only_friendly() -> None:
    assert instructions("USER")[-1] == "65532:65532"
    env = " ".join(instructions("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    assert instructions("WORKDIR")[-1] == "/tmp"


def test_tini_runs_token_scaler() -> None:
    entrypoint = json.loads(instructions("ENTRYPOINT")[-1])
    assert "tini" in entrypoint[0] and entrypoint[1:] == ["--", "token-scaler"]


def test_build_script_is_valid_bash() -> None:
    script = ROOT / "scripts" / "build-image"
    assert os.access(script, os.X_OK)
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
