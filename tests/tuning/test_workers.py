"""Worker processes of ``simulate --jobs``: results in the order asked, and no worker left
behind when the caller is killed (``tuning.workers``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tuning.workers import in_order

# The caller: two workers, each on a task of ten minutes; each says so when it starts, in one
# write to the pipe (atomic: the two lines cannot interleave).
CALLER = (
    "import functools, os, time; from tuning.workers import in_order; "
    "list(in_order(time.sleep, [600, 600], 2, functools.partial(os.write, 1), b'up\\n'))"
)


def test_results_come_back_in_the_order_asked() -> None:
    assert list(in_order(abs, [-3, 1, -2, 5], 2, print, "up")) == [3, 1, 2, 5]
    assert list(in_order(abs, [-3, 1], 1, print, "up")) == [3, 1]


def _children(parent: int) -> list[int]:
    """The processes ``parent`` spawned as pool workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == parent and b"spawn_main" in cmdline:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; reaping it is its new parent's business


def test_workers_exit_when_their_caller_is_killed() -> None:
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    workers: list[int] = []
    try:
        assert caller.stdout is not None
        assert [caller.stdout.readline(), caller.stdout.readline()] == ["up\n", "up\n"]
        workers = _children(caller.pid)
        assert len(workers) == 2
        caller.kill()  # no chance to shut its pool down
        caller.wait()
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers outlived their caller"
    finally:
        caller.kill()
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
