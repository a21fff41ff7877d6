"""Independent simulation runs in worker processes, their results in the order asked.

Workers are spawned (a fresh interpreter each, not a fork of the caller: a fork copies the
locks the caller's other threads hold) and receive the state every task shares once, when
they start, through ``start`` and ``shared``: both must be picklable (module-level functions,
``functools.partial`` of one, dataclasses of arrays), as must each task and its result.
With one job, or one task, everything runs in the caller, in order, and nothing is pickled.
A worker whose caller is gone (killed, so it could not shut the pool down) exits within a
second or two rather than wait for tasks that will never come.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _exit_when_orphaned(caller: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != caller:
            os._exit(1)


def _start_worker(start: Callable[[Any], None], caller: int, shared: Any) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(caller,), name="caller-watch", daemon=True).start()
    start(shared)


def in_order(
    task: Callable[[T], R],
    items: Sequence[T],
    jobs: int,
    start: Callable[[Any], None],
    shared: Any,
) -> Iterator[R]:
    """``task`` of each item, in the order of ``items``; ``start(shared)`` runs once in each
    worker before its first task (and once here when nothing is spawned)."""
    jobs = min(jobs, len(items))
    if jobs <= 1:
        start(shared)
        yield from map(task, items)
        return
    context = multiprocessing.get_context("spawn")
    initializer = functools.partial(_start_worker, start, os.getpid())
    with ProcessPoolExecutor(jobs, context, initializer=initializer, initargs=(shared,)) as pool:
        yield from pool.map(task, items)
