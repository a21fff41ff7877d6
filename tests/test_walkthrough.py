"""docs/walkthrough.md stays true: its marked shell blocks run, and print what the page shows.

The blocks after a ``<!-- walkthrough: run -->`` comment run in order in one bash process (the
servers they start in the background are its jobs), on free ports instead of the page's, with the
tests' fake model server, a redis-server of their own, and this checkout's ``token-scaler``. The
block after a ``<!-- walkthrough: output -->`` comment is what the run block before it prints:
line for line, where numbers that depend on timing may differ, and the numbers are checked
against each other.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from token_scaler.redis_conn import free_port

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "walkthrough.md"
PAGE_PORTS = (6390, 8000, 8080, 9090, 9091, 9100)
MARKER = "@@walkthrough block {}@@"
NUMBER = r"[0-9][0-9.,]*"


@dataclass
class Block:
    code: str
    output: list[str] = field(default_factory=list)


def blocks(text: str) -> list[Block]:
    """The page's run blocks, each with the output block that follows it, if any."""
    found: list[Block] = []
    for kind, code in re.findall(r"<!-- walkthrough: (run|output) -->\n```[a-z]*\n(.*?)```\n", text, re.S):
        if kind == "run":
            found.append(Block(code))
        else:
            assert found, "an output block before any run block"
            found[-1].output = code.splitlines()
    return found


def script(page_blocks: list[Block], ports: dict[int, int]) -> str:
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for i, block in enumerate(page_blocks):
        code = re.sub(
            r"\b(" + "|".join(map(str, ports)) + r")\b", lambda m: str(ports[int(m.group(1))]), block.code
        )
        lines += [f"echo '{MARKER.format(i)}'", code]
    return "\n".join(lines) + "\n"


def outputs(stdout: str, count: int) -> list[list[str]]:
    parts = re.split(r"^@@walkthrough block (\d+)@@\n", stdout, flags=re.M)
    by_block = {int(n): text.splitlines() for n, text in zip(parts[1::2], parts[2::2], strict=True)}
    return [by_block.get(i, []) for i in range(count)]


def pattern(line: str) -> str:
    return "^" + NUMBER.join(re.escape(part) for part in re.split(NUMBER, line)) + "$"


def numbers(line: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(NUMBER, line)]


def test_the_page_marks_its_blocks() -> None:
    page_blocks = blocks(PAGE.read_text())
    assert len(page_blocks) >= 5
    assert sum(1 for b in page_blocks if b.output) >= 3
    code = "".join(b.code for b in page_blocks)
    for command in (
        "redis-server",
        "fake_upstream",
        "token-scaler serve",
        "token-scaler sidecar",
        "/debug/scalers",
    ):
        assert command in code, command


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    for tool in ("redis-server", "redis-cli", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"the walkthrough needs {tool} on PATH")
    page_blocks = blocks(PAGE.read_text())
    ports = {port: free_port() for port in PAGE_PORTS}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        ["bash", "-c", script(page_blocks, ports)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        # The page's last block stops its servers; what still drains or hangs goes with the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}\nlogs: {logs}"

    got = outputs(stdout, len(page_blocks))
    shown = [(block.output, lines) for block, lines in zip(page_blocks, got, strict=True) if block.output]
    assert len(shown) == 3
    (metrics_doc, metrics), (keda_doc, keda), (view_doc, view) = shown

    # The sidecar's counts are exact: the fake model server's usage does not depend on timing.
    assert sorted(metrics) == sorted(metrics_doc)

    for doc_lines, lines in ((keda_doc, keda), (view_doc, view)):
        assert len(lines) == len(doc_lines), lines
        for doc_line, line in zip(doc_lines, lines, strict=True):
            assert re.match(pattern(doc_line), line), f"{line!r} is not shaped like {doc_line!r}"

    value, target = numbers(keda[0])
    assert value > 0
    assert target == pytest.approx(100 / 1.3, abs=0.05)
    prompt, generated = numbers(view[0])
    demand, _covered, live = numbers(view[1])
    replicas = numbers(view[2])[0]
    assert live == 1
    assert prompt > 0 and generated > 0
    # Both weights are 1: the demand is the prompt and generated tokens/s together.
    assert demand == pytest.approx(prompt + generated, abs=0.2)
    # Every request had the same prompt and 50 generated tokens; the window holds all of them.
    sidecar_prompt, sidecar_generated = sorted(numbers(line)[-1] for line in metrics)
    assert prompt / generated == pytest.approx(sidecar_prompt / sidecar_generated, rel=0.01)
    assert replicas == math.ceil(demand / (100 / 1.3) - 1e-9)
