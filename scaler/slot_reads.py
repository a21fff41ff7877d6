"""The scaler's reads of the workload streams on a Redis Cluster.

A cluster answers a multi-key command only when all its keys hash to one slot, and every
workload's stream has a slot of its own (its hash tag), so following N workloads takes N
``XREAD`` commands a round. They go through the project's pipelined cluster channel
(``token_scaler/redis_routing.py``): one connection per master, every command of a round to
one master in one write, replies parsed by hiredis, ``MOVED``/``ASK`` followed and the map of
slots read again after a failover.

A round sends one ``XREAD`` per slot that has none in flight and waits for the replies at
most ``wait_s``: a master that does not answer (gone without a reset, or being failed over)
holds up only its own slots, whose reads stay in flight and are taken by a later round when
they come, or fail when the connection does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ResponseError

from token_scaler.redis_routing import ClusterChannel

Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass
class Round:
    """What one round brought: entries per stream, the streams whose master answered, and
    the error of each stream whose read failed."""

    found: list[tuple[str, Entries]] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)
    failed: dict[str, BaseException] = field(default_factory=dict)


@dataclass
class _Read:
    keys: tuple[str, ...]
    reply: asyncio.Future[Any]
    sent: float


def _entries(raw: Any) -> Entries:
    """An XREAD stream's entries as hiredis gives them ([id, [field, value, ...]]), with
    their fields as a mapping, the shape ``token_scaler.record.decode`` reads."""
    out: Entries = []
    for entry_id, flat in raw:
        values = iter(flat or ())
        out.append((entry_id, dict(zip(values, values, strict=True))))
    return out


class SlotReads:
    def __init__(self, channel: ClusterChannel, *, batch: int, wait_s: float) -> None:
        self.channel = channel
        self.batch = batch
        self.wait_s = wait_s
        self._slot_of: dict[str, int] = {}
        self._reads: dict[int, _Read] = {}  # slot -> the read in flight

    def in_flight(self) -> int:
        return len(self._reads)

    async def round(self, streams: Mapping[str, str]) -> Round:
        """Read every stream of ``streams`` (key -> last ID read) whose slot has no read in
        flight, and take every read that answers within ``wait_s``."""
        groups: dict[int, dict[str, str]] = {}
        for key, last in streams.items():
            slot = self._slot_of.get(key)
            if slot is None:
                slot = self._slot_of[key] = key_slot(key.encode())
            groups.setdefault(slot, {})[key] = last
        now = time.monotonic()
        for slot, group in groups.items():
            if slot in self._reads:
                continue
            keys = tuple(group)
            reply = self.channel.send_keyed(
                keys[0], "XREAD", "COUNT", self.batch, "STREAMS", *keys, *group.values()
            )
            self._reads[slot] = _Read(keys, reply, now)
        if self._reads:
            await asyncio.wait([read.reply for read in self._reads.values()], timeout=self.wait_s)
        result = Round()
        for slot, read in list(self._reads.items()):
            if not read.reply.done():
                continue
            del self._reads[slot]
            error = read.reply.exception()
            answer = None if error is not None else read.reply.result()
            if isinstance(answer, ResponseError):
                error = answer
            if error is not None:
                result.failed.update(dict.fromkeys(read.keys, error))
                continue
            result.answered.update(read.keys)
            for raw_key, raw_entries in answer or ():
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                result.found.append((key, _entries(raw_entries)))
        return result

    def forget(self, key: str) -> None:
        self._slot_of.pop(key, None)

    async def close(self) -> None:
        for read in self._reads.values():
            read.reply.cancel()
        self._reads.clear()
        with contextlib.suppress(Exception):
            await self.channel.close()
