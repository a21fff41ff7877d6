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


def run_demo(*args: str, redis_url: str | None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``token-scaler demo ARGS`` to its end, on ``redis_url`` (None: the demo's own Redis)."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    result = subprocess.run(
        [sys.executable, "-m", "token_scaler.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_demo_runs_counts_exactly_and_stops_by_itself() -> None:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not on PATH")
    result = run_demo("--duration", "40", redis_url=None)
    out = result.stdout
    assert "embedded redis-server" in out
    assert "HPA replicas" in out and out.count(" | ") > 100  # a row a second
    assert "-> equal" in out, out[-800:]
    assert "everything stopped." in out
    assert result.stderr == ""
    # The default scenario: the same request rate, answers 16x longer. The token signal asks
    # for more replicas than the request signal, which hardly moves.
    before = re.search(r"before the phase .*by tokens (\d+), by req/s (\d+)", out)
    during = re.search(r"at the end of 'long answers' .*by tokens (\d+), by req/s (\d+)", out)
    assert before and during, out[-800:]
    assert int(during.group(1)) > int(during.group(2)), out[-800:]
    assert int(during.group(1)) > int(before.group(1)), out[-800:]


def test_a_rerun_on_the_same_redis_starts_afresh_and_leaves_nothing(redis_url: str) -> None:
    """The demo removes its workload's keys before and after: both runs count exactly, and the
    module's key check finds nothing left."""
    for _ in range(2):
        result = run_demo("--duration", "20", redis_url=redis_url)
        assert f"Redis at {redis_url} (REDIS_URL)" in result.stdout
        assert "-> equal" in result.stdout, result.stdout[-800:]


def test_demo_from_zero_goes_to_n_and_back_to_zero(redis_url: str) -> None:
    result = run_demo("--from-zero", "--duration", "120", "--rps", "3", redis_url=redis_url, timeout=200)
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
        start_new_session=True,  # a group of its own, as a terminal's foreground job
    )
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "\n    6 | " not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "in-process Redis-compatible server (fakeredis)" in seen
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole group
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == ""  # quiet: no traceback, no warning
    assert "cut short by Ctrl-C" in rest
    assert "everything stopped." in rest
    assert children_of(proc.pid) == []
