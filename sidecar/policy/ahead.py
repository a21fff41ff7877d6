"""Reserving ahead: a busy tenant's chunks taken off the request path, drawn from, checkpointed.

chunks.py says when a chunk is taken, how large, and when it is retired; this is its I/O:
the reservation of a chunk (``admit.lua``, riding in the loop iteration's write), its
checkpoints (``checkpoint.lua``, riding with the settlements' outbox) and what their
replies say (a chunk Redis lost is charged without it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable

from redis.exceptions import ResponseError

from sidecar.policy import chunks
from sidecar.policy.admission import Admission, Limits, resets
from sidecar.policy.context import Context
from sidecar.policy.failopen import Outage
from sidecar.policy.reserve import Reserver
from sidecar.policy.scripts import Applied
from sidecar.policy.settlement import (
    BATCH,
    SETTLE_LINGER_S,
    Corrections,
    Settlement,
    Settlements,
    batch_replies,
    script_fault,
)
from sidecar.policy.store import Item, Settled, checkpoint_args
from sidecar.policy.tickets import Ticket
from sidecar.policy.upkeep import Presence
from sidecar.policy.usage import Usage
from token_scaler.redis_conn import REDIS_ERRORS

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Checkpoint:
    """A chunk's state as sent, to apply its reply."""

    chunk: chunks.Chunk
    seq: int
    item: Item  # (keys, checkpoint.lua's arguments)
    charged: tuple[int, int]
    final: bool  # the last: the chunk is forgotten once Redis took it
    closed_before: bool  # an earlier checkpoint held nothing: the entry may be gone already


def key_of(ticket: Ticket) -> chunks.Key:
    """What a chunk is for: a request's Redis keys and limits."""
    return (
        *ticket.keys,
        ticket.tenant_interval,
        ticket.model_interval,
        ticket.wide_key,
        ticket.wide_interval,
    )


class Ahead:
    def __init__(
        self,
        held: chunks.Chunks,
        *,
        ctx: Context,
        outage: Outage,
        usage: Usage,
        presence: Presence,
        reserver: Reserver,
        settlements: Settlements,
        corrections: Corrections,
    ) -> None:
        self.chunks = held  # every chunk not closed in Redis yet
        self._ctx = ctx
        self._outage = outage
        self._usage = usage
        self._presence = presence
        self._reserver = reserver
        self._settlements = settlements
        self._corrections = corrections
        self.asking: set[asyncio.Task[None]] = set()  # chunks being asked for
        self.closing = False  # no more chunks asked for
        self._checkpoint_timer: asyncio.TimerHandle | None = None  # the next checkpoint due
        self._checkpoint_due = math.inf
        settlements.ride(self.send_checkpoints)

    @property
    def busy(self) -> bool:
        """A checkpoint is due later (its timer runs)."""
        return self._checkpoint_timer is not None

    def draw(self, admission: Admission, ticket: Ticket, limits: Limits) -> bool:
        """Admit from a chunk when one has room (no round trip); ask for the next one when due."""
        now = self._ctx.clock.monotonic()
        key = key_of(ticket)
        demand = self.chunks.seen(key, now, ticket.cost, ticket.tokens)
        retirements = self.chunks.retirements
        chunk = self.chunks.draw(key, ticket.tenant, ticket.cost, ticket.tokens, now, demand)
        if not self._outage.down and not self.closing:
            self._ask_ahead(key, demand, ticket, limits, now)
        if self.chunks.retirements != retirements:
            if chunk is None:
                # Retired just now: what it did not use goes back in the write of this
                # request's own admission, ahead of it.
                self.send_checkpoints()
            else:
                self._settlements.soon()
        if chunk is None:
            return False
        admission.ticket = ticket
        admission.chunk = chunk
        admission.headers.update(chunk.remaining_headers(now))
        self._ctx.metrics.admissions.labels("chunk").inc()
        return True

    def end(self, chunk: chunks.Chunk, ticket: Ticket, cost: int, tokens: int) -> None:
        """A request drawn from ``chunk`` ended: charged to it, the next checkpoint tells Redis."""
        self.chunks.end(chunk, ticket.cost, ticket.tokens, cost, tokens)
        self._settlements.soon()

    def retire_all(self) -> None:
        """The policy changed: what the chunks hold comes back (with their next checkpoints)."""
        self.chunks.retire_all()

    def expire(self) -> None:
        if self.chunks:
            self.chunks.expire(self._ctx.clock.monotonic(), self._ctx.file.policy.chunks.seconds)

    def _ask_ahead(
        self, key: chunks.Key, demand: chunks.Demand, template: Ticket, limits: Limits, now: float
    ) -> None:
        if not self.chunks.may_ask(key, now):
            return
        last = self.chunks.targets.get(key)
        if last is not None and not self.chunks.wants(key, last, now):
            return  # plenty left by the last sizing: the demand need not be sized again
        rules = self._ctx.file.policy.chunks
        target = chunks.size(
            demand,
            now,
            seconds=rules.seconds,
            min_rps=rules.min_requests_per_second,
            budget_left=self._usage.left(template),
            bursts=[limit.tau_ms / limit.interval_ms for limit in limits if limit is not None],
            peers=self._presence.peers,
        )
        if target is None:
            self.chunks.targets.pop(key, None)
            return
        self.chunks.targets[key] = target
        if not self.chunks.wants(key, target, now):
            return
        self.chunks.taking.add(key)
        task = asyncio.create_task(self._take(key, template, limits, target, self._ctx.file.generation))
        self.asking.add(task)
        task.add_done_callback(self.asking.discard)

    async def _take(
        self, key: chunks.Key, template: Ticket, limits: Limits, target: chunks.Size, generation: int
    ) -> None:
        """Reserve a chunk: admit.lua (and the model's limit across tenants) for ``target``."""
        ticket = dataclasses.replace(
            template,
            id=self._reserver.new_id(),
            cost=target.cost,
            tokens=target.tokens,
            reserved=True,
            limits=[],
        )
        asked = self._ctx.clock.monotonic()
        try:
            async with asyncio.timeout(self._ctx.file.background_timeout_s):
                reply, wide_reply = await self._reserver.ask(ticket, target.least, limits, waiting=False)
        except REDIS_ERRORS as exc:
            self._outage.failed("chunk", exc)
            self._settlements.release(ticket)
            self.chunks.backoff[key] = self._ctx.clock.monotonic() + chunks.BACKOFF_S
            return
        except asyncio.CancelledError:
            self._settlements.release(ticket)
            raise
        finally:
            self.chunks.taking.discard(key)
        if self._reserver.refused(ticket, reply, wide_reply):
            # A limit is near: requests reserve alone for a while (exact, one round trip each).
            self.chunks.backoff[key] = self._ctx.clock.monotonic() + chunks.BACKOFF_S
            self._ctx.metrics.chunks.labels("refused").inc()
            self._reserver.noted(reply, ticket)
            return
        asked_tokens = ticket.tokens
        if reply.granted < ticket.cost:  # the script scales the tokens alike
            ticket.tokens = math.ceil(ticket.tokens * reply.granted / ticket.cost)
        ticket.cost = reply.granted
        now = self._ctx.clock.monotonic()
        chunk = chunks.Chunk(
            ticket,
            ticket.cost,
            ticket.tokens,
            resets(limits, reply, wide_reply),
            now,
            now,
            asked_tokens if ticket.wide_key else 0,
            until=asked + self._ctx.file.draw_window_s,
            checkpoint_s=target.checkpoint_s,
            age_s=target.age_s,
        )
        if self.chunks.succeeded(key, now):
            self._settlements.soon()  # what the old one did not use goes back
        self.chunks.add(key, chunk)
        self._ctx.metrics.chunks.labels("taken").inc()
        if generation != self._ctx.file.generation or self.closing:
            self.chunks.retire(chunk)  # asked for under a policy no longer in force
            self._settlements.soon()
        self._reserver.noted(reply, ticket)

    async def stop(self, timeout_s: float) -> None:
        """At shutdown: no more chunks asked for, and those held retired (their unused part
        goes back to the tenants with the next checkpoints)."""
        self.closing = True
        for task in self.asking:  # a chunk asked for now would only be released again
            task.cancel()
        if self.asking:
            await asyncio.wait(set(self.asking), timeout=timeout_s)
        self.chunks.retire_all()

    def stop_timer(self) -> None:
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer, self._checkpoint_due = None, math.inf

    def send_checkpoints(self) -> None:
        """Queue the state of the chunks that changed now (in the write of whatever is sent
        next); their replies are awaited apart."""
        if not self.chunks or self._outage.down:
            return
        now = self._ctx.clock.monotonic()
        dirty, due = self.chunks.dirty(now)
        if due < self._checkpoint_due:  # the others wait for their turn (those due together
            # within a linger go in one write), not in a busy loop
            if self._checkpoint_timer is not None:
                self._checkpoint_timer.cancel()
            self._checkpoint_due = due
            self._checkpoint_timer = asyncio.get_running_loop().call_later(
                max(due - now, SETTLE_LINGER_S), self._checkpoints_due
            )
        for start in range(0, len(dirty), BATCH):
            batch = [self._state(chunk) for chunk in dirty[start : start + BATCH]]
            sent = self._ctx.store.checkpoint_many([state.item for state in batch])
            self._settlements.track(self._checkpointed(batch, sent))

    def _checkpoints_due(self) -> None:
        self._checkpoint_timer, self._checkpoint_due = None, math.inf
        self.send_checkpoints()

    def _state(self, chunk: chunks.Chunk) -> _Checkpoint:
        """A chunk's state as a checkpoint (and the correction of the model's limit across
        tenants, its own slot, sent with it)."""
        chunk.seq += 1
        held = chunk.held()
        ticket = chunk.ticket
        charged = (chunk.real_cost, chunk.real_tokens)
        args = checkpoint_args(
            id=ticket.id,
            seq=chunk.seq,
            held=held,
            charged=charged,
            daily=ticket.budget.daily is not None,
            monthly=ticket.budget.monthly is not None,
            tenant_interval=ticket.tenant_interval,
            model_interval=ticket.model_interval,
        )
        state = _Checkpoint(chunk, chunk.seq, (ticket.keys, args), charged, chunk.final, chunk.closing_sent)
        if held == (0, 0):
            # It closes the entry (set when sent: if its reply is lost, a loss of the chunk
            # by Redis goes unseen, and its usage since the last checkpoint with it).
            chunk.closing_sent = True
            self.chunks.retire(chunk)  # all drawn and ended: nothing more may be drawn
        if ticket.wide_key is not None:
            counted = held[1] + chunk.real_tokens
            if counted != chunk.wide_counted:
                moved = (counted - chunk.wide_counted) * ticket.wide_interval
                chunk.wide_counted = counted
                self._corrections.move(ticket.wide_key, moved)
        return state

    async def _checkpointed(
        self, batch: list[_Checkpoint], sent: Awaitable[list[Settled | BaseException]]
    ) -> bool:
        """Apply the replies of a batch of checkpoints; a chunk whose checkpoint Redis did not
        take is sent again with the next (only the latest state counts)."""

        def again() -> None:
            for state in batch:
                state.chunk.dirty = True

        timeout_s = self._ctx.file.policy.redis_timeout_s
        replies = await batch_replies(self._outage, timeout_s, "checkpoint", sent, again)
        if replies is None:
            return False
        failure: BaseException | None = None
        for state, reply in zip(batch, replies, strict=True):
            if (error := self._apply_checkpoint(state, reply)) is not None:
                failure = error
        if failure is not None:
            self._outage.failed("checkpoint", failure)
            return False
        return True

    def _apply_checkpoint(self, state: _Checkpoint, reply: Settled | BaseException) -> BaseException | None:
        """Apply the reply to one checkpoint; the error when Redis did not answer it (the chunk
        is sent again with the next)."""
        chunk, ticket = state.chunk, state.chunk.ticket
        if isinstance(reply, ResponseError) and script_fault(reply):
            # It would fail again: said loudly; the chunk admits no more and is dropped once
            # its requests have ended (its lease releases what it holds).
            self._ctx.metrics.redis_errors.labels("checkpoint_script").inc()
            log.error(
                "Redis refused the checkpoint of a chunk of tenant %s (charged %s tokens, cost %s): %s",
                ticket.tenant,
                chunk.real_tokens,
                chunk.real_cost,
                reply,
            )
            self.chunks.retire(chunk)
            if state.final:
                self.chunks.forget(chunk)
            return None
        if isinstance(reply, BaseException):
            chunk.dirty = True
            return reply
        if reply.applied == Applied.NONE and not state.closed_before:
            self._lost(state)
            if state.final:
                self.chunks.forget(chunk)
            return None
        if reply.applied == Applied.RELEASED:
            log.warning(
                "a chunk of tenant %s was released when its lease ended (this sidecar stalled "
                "past reservationLeaseSeconds): its requests are charged in full",
                ticket.tenant,
            )
            self.chunks.retire(chunk)
        if reply.applied and state.seq > chunk.acked_seq:
            chunk.acked, chunk.acked_seq = state.charged, state.seq
        if state.final:
            self.chunks.forget(chunk)
        self._usage.saw(ticket, reply.day_used, reply.month_used)
        return None

    def _lost(self, state: _Checkpoint) -> None:
        """Redis has no trace of a chunk it granted (a failover to a replica that missed it, a
        restart without persistence): no more draws from it, and its usage is charged without
        a reservation, once. Replication keeps order, so a Redis without the chunk's grant
        has none of its checkpoints either: all that was charged to it is charged again (a
        Redis that evicts keys would be charged twice for what it kept: run it with
        ``maxmemory-policy noeviction``)."""
        chunk = state.chunk
        ticket = chunk.ticket
        if state.seq <= chunk.lost_seq:
            return  # an older checkpoint's reply: the newer one charged it
        cost, tokens = state.charged[0] - chunk.lost_charged[0], state.charged[1] - chunk.lost_charged[1]
        if not chunk.lost_seq:
            self.chunks.retire(chunk)
            self._ctx.metrics.redis_errors.labels("chunk_lost").inc()
            log.error(
                "Redis lost a chunk of tenant %s (failover or restart?): it admits no more; "
                "its %s tokens (cost %s) are charged without it",
                ticket.tenant,
                tokens,
                cost,
            )
        chunk.lost_seq, chunk.lost_charged = state.seq, state.charged
        if cost:  # a charge without a reservation moves budgets only (as fail-open's do)
            unreserved = dataclasses.replace(
                ticket, id=f"{ticket.id}.{state.seq}", reserved=False, wide_key=None
            )
            self._outage.add(ticket.tenant, cost)
            self._settlements.post(Settlement(unreserved, cost, tokens, moved=True))
