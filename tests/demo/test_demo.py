"""`token-scaler demo`, as a newcomer runs it: it works, counts exactly, stops by itself or on
Ctrl-C, and leaves nothing running."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_demo_runs_counts_exactly_and_stops_by_itself() -> None:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not on PATH")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "token_scaler.cli", "demo", "--duration", "40"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "embedded redis-server" in out
    assert "HPA replicas" in out and out.count(" | ") > 100  # a row a second
    assert "-> equal" in out, out[-800:]
    assert "everything stopped." in out
    assert "Traceback" not in result.stderr


def test_demo_from_zero_goes_to_n_and_back_to_zero(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, "-m", "token_scaler.cli", "demo", "--from-zero", "--duration", "120", "--rps", "3"],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "held at gateway" in out and out.count(" | ") > 50  # a row a second
    sent, answered = (
        int(x) for x in re.search(r"requests: (\d+) sent through the gateway, (\d+) answered", out).groups()
    )
    assert sent == answered > 0, out[-600:]
    peak = int(re.search(r"replicas: 0 -> (\d+) -> 0\n", out).group(1))
    assert peak >= 1
    assert "everything stopped." in out
    assert "Traceback" not in result.stderr


def test_demo_without_redis_server_uses_the_in_process_one_and_exits_on_ctrl_c(tmp_path: Path) -> None:
    pytest.importorskip("fakeredis")
    # a PATH with python but no redis-server
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PATH"] = str(bin_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "token_scaler.cli", "demo", "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "  6s |" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "in-process Redis-compatible server (fakeredis)" in seen
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "everything stopped." in rest
    assert children_of(proc.pid) == []
