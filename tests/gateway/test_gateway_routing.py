"""Token-weighted routing, the hold queue's order, and the gateway-vs-sidecar counting contract."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.demand import HeldDemand
from gateway.queue import HoldQueue, QueueFull, Waiter
from gateway.router import Replica, Router
from scaler.metadata import parse
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from tests.sidecar.conftest import gauges
from token_scaler.presence import Announcement
from token_scaler.record import GATEWAY, ModelCounts, Record


def router_of(*capacities: int, models: tuple[str, ...] = ()) -> Router:
    router = Router()
    router.update(
        {f"r{i}": (1, Announcement(f"http://r{i}", models, cap)) for i, cap in enumerate(capacities)}
    )
    return router


def test_least_outstanding_weighted_tokens_wins() -> None:
    router = router_of(0, 0, 0)
    r0, r1, r2 = router.replicas.values()
    router.start(r0, 5000)  # one long request
    router.start(r1, 100)
    router.start(r1, 100)  # two short ones: more connections, fewer tokens
    assert router.pick(None, 50) is r2
    router.start(r2, 300)
    assert router.pick(None, 50) is r1  # 200 tokens < 300 < 5000, whatever the request count
    router.progress(r0, 4900)  # the long one streamed most of its tokens
    assert router.pick(None, 50) is r0


def test_capacity_caps_in_flight_tokens_and_an_idle_replica_takes_anything() -> None:
    router = router_of(1000, 1000)
    r0, r1 = router.replicas.values()
    router.start(r0, 800)
    router.start(r1, 900)
    assert router.pick(None, 300) is None  # both would pass their cap: hold it
    assert router.pick(None, 200) is r0  # the least loaded, with room
    assert router.pick(None, 201) is None
    router.finish(r1, 900)
    assert router.pick(None, 5000) is r1  # idle: a request above the cap still runs, alone


def test_slots_cap_requests_in_flight() -> None:
    router = Router()
    router.update({"a": (1, Announcement("http://a", slots=2)), "b": (1, Announcement("http://b", slots=1))})
    a, b = router.replicas["a"], router.replicas["b"]
    router.start(a, 10)
    router.start(b, 1)
    assert router.pick(None, 10) is a  # b has no free slot, though fewer tokens
    router.start(a, 10)
    assert router.pick(None, 10) is None
    # Another gateway's request, from the sidecar's heartbeat, fills a slot too.
    router.finish(b, 1)
    assert router.pick(None, 10) is b
    router.update(
        {"a": (2, Announcement("http://a", slots=2)), "b": (2, Announcement("http://b", slots=1, inflight=1))}
    )
    assert router.pick(None, 10) is None


def test_announced_load_counts_other_gateways_until_the_next_heartbeat() -> None:
    router = Router()
    router.update(
        {"a": (1, Announcement("http://a", (), 0, 3, 700, 300)), "b": (1, Announcement("http://b"))}
    )
    a, b = router.replicas["a"], router.replicas["b"]
    assert a.load == 1000 and router.pick(None, 10) is b
    router.start(b, 1500)
    assert router.pick(None, 10) is a
    # The same heartbeat read again changes nothing; a new one replaces the sum.
    router.update(
        {"a": (1, Announcement("http://a", (), 0, 3, 700, 300)), "b": (1, Announcement("http://b"))}
    )
    assert b.load == 1500
    router.update({"a": (2, Announcement("http://a", (), 0, 0, 0, 0)), "b": (2, Announcement("http://b"))})
    assert a.load == 0 and b.load == 1500


def test_models_route_to_their_replicas_and_unnamed_ones_serve_any() -> None:
    router = Router()
    router.update(
        {
            "big": (1, Announcement("http://big", ("llama-70b",))),
            "small": (1, Announcement("http://small", ("llama-8b",))),
        }
    )
    assert router.pick("llama-70b", 10) is router.replicas["big"]
    assert router.pick("llama-8b", 10) is router.replicas["small"]
    assert router.pick("other", 10) is None
    router.update({"any": (1, Announcement("http://any"))})
    assert router.pick("other", 10) is router.replicas["any"]


def test_a_replica_that_refused_is_left_out_for_a_while() -> None:
    router = router_of(0, 0)
    r0, r1 = router.replicas.values()
    router.mark_down(r0, now=100.0)
    assert router.pick(None, 1, now=101.0) is r1
    router.start(r1, 10_000)
    assert router.pick(None, 1, now=101.0) is r1
    assert router.pick(None, 1, now=106.0) is r0


async def test_queue_keeps_arrival_order_per_model_and_its_bounds() -> None:
    queue = HoldQueue(max_requests=4, max_tokens=1000)
    a1 = queue.add("a", 600)
    b1 = queue.add("b", 100)
    a2 = queue.add("a", 50)
    try:
        queue.add("a", 300)
    except QueueFull as exc:
        assert "bound of 1000 held tokens" in str(exc)
    else:
        raise AssertionError("the token bound let a request pass")
    room = {"a": 100, "b": 100}  # a's first request does not fit; it must not be overtaken by a2

    def place(waiter: Waiter) -> Replica | None:
        assert waiter.model is not None
        if waiter.tokens > room[waiter.model]:
            return None
        room[waiter.model] -= waiter.tokens
        return Replica(waiter.model, "http://x", frozenset(), 0)

    assert queue.dispatch(place) == 1
    assert b1.future.done() and not a1.future.done() and not a2.future.done()
    room["a"] = 650
    assert queue.dispatch(place) == 2
    assert a1.future.done() and a2.future.done() and len(queue) == 0 and queue.tokens == 0
    await asyncio.sleep(0)


# -- the counting contract: the scaler sums gateway and sidecar entries, nothing twice -------

SETTINGS = parse(
    {"tokensPerSecondPerReplica": "100", "windowSeconds": "10", "panicWindowSeconds": "2"}, "ns", "w"
)


def sidecar_record(seq: int, ts: int, prompt: int, generation: int) -> Record:
    counts = ModelCounts(prompt, generation, prompt, generation, 1, arrived_requests=1)
    return Record("pod-a", seq, ts, 1000, {"m": counts})


@settings(max_examples=60, deadline=None)
@given(
    held=st.lists(st.tuples(st.integers(1, 500), st.integers(1, 500)), min_size=1, max_size=8),
    wait_s=st.integers(0, 4),
    real=st.lists(st.tuples(st.integers(1, 600), st.integers(0, 600)), min_size=1, max_size=8),
)
def test_gateway_and_sidecar_entries_never_count_a_request_twice(
    held: list[tuple[int, int]], wait_s: int, real: list[tuple[int, int]]
) -> None:
    demand = HeldDemand()
    base = 1_000_000_000  # Redis ms, at a whole second
    series = WorkloadSeries()
    tickets = [demand.hold("m", p, g) for p, g in held]
    # Holding starts: the wake record in the last complete second.
    wake = Record("gw-1", 1, base + 300 - 300 - 1, 1, demand.take(), role=GATEWAY)
    assert wake.models["m"].arrived_requests == len(held)
    series.add(wake, f"{base + 300}-0")
    at_arrival = evaluate(series, SETTINGS, base + 300)
    assert at_arrival.active
    held_weighted = sum(p + g for p, g in held)
    assert at_arrival.stable.arrived * at_arrival.coverage_s == held_weighted
    # A replica appears wait_s later: the gateway takes the arrivals back, the sidecar counts
    # the requests as it serves them (real usage differs from the estimates).
    t = base + 1000 * (1 + wait_s) + 500
    for ticket in tickets:
        demand.release(ticket)
    released = demand.take()
    assert gauges(released["m"]) == (0, 0, 0, 0)  # the gauges drop to zero in it
    # handed to a replica: the gateway takes its arrivals back, the sidecar counts them
    assert released["m"].arrived_requests == -len(held)
    series.add(Record("gw-1", 2, t, 1000 * (1 + wait_s), released, role=GATEWAY), f"{t}-0")
    for i, (p, g) in enumerate(real):
        series.add(sidecar_record(i + 1, t + 10, p, g), f"{t + 10}-{i}")
    later = evaluate(series, SETTINGS, t + 2000)
    covered = later.coverage_s
    real_weighted = sum(p + g for p, g in real)
    assert round(later.stable.arrived * covered) == real_weighted
    assert round(later.stable.served * covered) == real_weighted
    assert demand.take() == {}  # nothing more to say
    assert set(series.live_sidecars(t + 2000, 5000)) == {"pod-a"}
    # The gateway's entries are no replica running: only the sidecar's count as present.
    assert series.presence.window(base // 1000 - 1, t // 1000 + 1)[0].sum() == len(real)


def test_held_demand_takes_each_arrival_back_when_it_stops_holding() -> None:
    demand = HeldDemand()
    first, second = demand.hold("m", 10, 20), demand.hold("m", 5, 7)
    counts = demand.take()["m"]
    assert (counts.arrived_requests, counts.arrived_prompt, gauges(counts)) == (2, 15, (2, 2, 15, 27))
    demand.release(first)  # handed to a replica
    demand.release(first)  # a second release changes nothing
    counts = demand.take()["m"]
    assert (counts.arrived_requests, counts.arrived_prompt, gauges(counts)) == (-1, -10, (1, 1, 5, 7))
    demand.release(second)  # refused, timed out or its client gone: taken back the same way
    counts = demand.take()["m"]
    assert (counts.arrived_requests, counts.arrived_prompt, gauges(counts)) == (-1, -5, (0, 0, 0, 0))
    assert demand.take() == {}
    demand.release(demand.hold("m", 3, 4))  # held and let go within one interval: nothing to say
    assert demand.take() == {}
