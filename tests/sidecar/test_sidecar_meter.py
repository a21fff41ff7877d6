"""The meter never loses nor double counts, whatever order events come in."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.meter import LabelBound, Meter, Request, Snapshot
from tests.sidecar.conftest import gauges

MODELS = ["a", "b"]
TENANTS = ["t1", "t2", "t3"]


@dataclass
class Truth:
    request: Request
    prompt_estimate: int
    first: bool = False
    generated: int = 0


def check_gauges(snapshot: Snapshot) -> None:
    for counts in snapshot.models.values():
        assert counts.inflight >= 0 and counts.waiting >= 0
        assert counts.backlog_prompt >= 0 and counts.backlog_generation >= 0
        assert counts.waiting <= counts.inflight


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_lifetime_sums_equal_final_counts(data: st.DataObject) -> None:
    meter = Meter(default_generation=data.draw(st.integers(0, 40)), ewma_alpha=0.5)
    live: list[Truth] = []
    finals: list[tuple[Request, int, int]] = []
    snapshots: list[Snapshot] = []
    for _ in range(data.draw(st.integers(1, 80))):
        op = data.draw(
            st.sampled_from(["arrive", "arrive", "first", "gen", "gen", "finish", "abort", "relabel", "take"])
        )
        if op == "arrive" or not live:
            model = data.draw(st.sampled_from(MODELS))
            n = data.draw(st.integers(1, 4))
            estimate = meter.generation_estimate(model, data.draw(st.none() | st.integers(1, 30)), n)
            prompt = data.draw(st.integers(0, 100))
            request = meter.arrive(model, data.draw(st.sampled_from(TENANTS)), prompt, estimate, n)
            live.append(Truth(request, prompt))
        elif op == "take":
            snapshots.append(meter.take())
            check_gauges(snapshots[-1])
        else:
            truth = live[data.draw(st.integers(0, len(live) - 1))]
            if op == "first":
                meter.first_token(truth.request)
                truth.first = True
            elif op == "gen":
                tokens = data.draw(st.integers(0, 5))
                meter.generated(truth.request, tokens)
                truth.generated += tokens
                truth.first = truth.first or tokens > 0
            elif op == "relabel":  # the server answered: the request moves to its label
                meter.relabel(truth.request, data.draw(st.sampled_from(MODELS)))
            elif op == "finish":
                prompt, generation = data.draw(st.integers(0, 100)), data.draw(st.integers(0, 100))
                meter.finish(truth.request, prompt, generation, complete=data.draw(st.booleans()))
                meter.finish(truth.request, 999, 999)  # a second settle must change nothing
                finals.append((truth.request, prompt, generation))
                live.remove(truth)
            else:
                meter.abort(truth.request)
                served_prompt = truth.prompt_estimate if truth.first else 0
                finals.append((truth.request, served_prompt, truth.generated))
                live.remove(truth)
    for truth in live:
        meter.abort(truth.request)
        finals.append((truth.request, truth.prompt_estimate if truth.first else 0, truth.generated))
    snapshots.append(meter.take())
    snapshots.append(meter.take())

    for model in MODELS:
        ours = [(p, g) for r, p, g in finals if r.model == model]
        sums = [0] * 5
        arrived = 0
        for snapshot in snapshots:
            counts = snapshot.models.get(model)
            if counts is not None:
                sums = [s + v for s, v in zip(sums, counts.as_list()[:5], strict=True)]
                arrived += counts.arrived_requests
        sp, sg, ap, ag, rq = sums
        assert sp == ap == sum(p for p, _ in ours)
        assert sg == ag == sum(g for _, g in ours)
        assert arrived == rq == len(ours)  # each request arrived once, under its last label
        last = snapshots[-2].models.get(model)
        if last is not None:
            assert gauges(last) == (0, 0, 0, 0)
        assert model not in snapshots[-1].models
    for tenant in TENANTS:
        seen = [0, 0, 0]
        for snapshot in snapshots:
            for tc in snapshot.tenants.get(tenant, {}).values():
                seen = [seen[0] + tc.prompt, seen[1] + tc.generation, seen[2] + tc.requests]
        mine = [(prompt, generation) for r, prompt, generation in finals if r.tenant == tenant]
        assert seen == [sum(x for x, _ in mine), sum(y for _, y in mine), len(mine)]


def test_long_generation_shows_before_it_ends() -> None:
    meter = Meter(default_generation=100)
    request = meter.arrive("m", "t", 50, meter.generation_estimate("m", None), 1)
    first = meter.take().models["m"]
    assert (first.arrived_prompt, first.arrived_generation, first.inflight, first.waiting) == (50, 100, 1, 1)
    assert first.arrived_requests == 1
    assert (first.backlog_prompt, first.backlog_generation, first.served_prompt) == (50, 100, 0)
    meter.generated(request, 30)
    second = meter.take().models["m"]
    assert (second.served_prompt, second.served_generation, second.waiting) == (50, 30, 0)
    assert (second.backlog_prompt, second.backlog_generation) == (0, 70)
    meter.finish(request, 48, 31)
    third = meter.take().models["m"]
    assert (third.served_prompt, third.served_generation, third.arrived_prompt, third.arrived_generation) == (
        -2,
        1,
        -2,
        -69,
    )
    assert (third.requests, third.arrived_requests) == (1, 0)  # it arrived in the first interval
    assert gauges(third) == (0, 0, 0, 0)
    assert meter.take().models == {}


def test_every_request_arrives_once_wherever_it_ends() -> None:
    meter = Meter(default_generation=10)
    snapshots = []
    plain = [meter.arrive("a", "t", 5, 10) for _ in range(3)]
    moved_early = meter.arrive("other", "t", 5, 10)
    moved_late = meter.arrive("other", "t", 5, 10)
    aborted = meter.arrive("b", "t", 5, 10)
    meter.relabel(moved_early, "a")  # in the interval it arrived in: "other" never shows it
    snapshots.append(meter.take())
    assert snapshots[0].models["a"].arrived_requests == 4
    assert snapshots[0].models["other"].arrived_requests == 1
    assert snapshots[0].models["b"].arrived_requests == 1
    meter.relabel(moved_late, "b")  # an interval later: its arrival moves, as its ap does
    snapshots.append(meter.take())
    assert snapshots[1].models["other"].arrived_requests == -1
    assert snapshots[1].models["b"].arrived_requests == 1
    meter.abort(aborted)  # an aborted request still arrived
    for request in [*plain, moved_early, moved_late]:
        meter.finish(request, 5, 10)
    snapshots.append(meter.take())
    snapshots.append(meter.take())
    arrived: dict[str, int] = {}
    ended: dict[str, int] = {}
    for snapshot in snapshots:
        for name, counts in snapshot.models.items():
            arrived[name] = arrived.get(name, 0) + counts.arrived_requests
            ended[name] = ended.get(name, 0) + counts.requests
    assert sum(arrived.values()) == 6
    assert arrived == {"a": 4, "b": 2, "other": 0}
    assert ended == {"a": 4, "b": 2, "other": 0}
    assert meter.take().models == {}


def test_generation_estimate_learns_the_mean_per_choice() -> None:
    meter = Meter(default_generation=256, ewma_alpha=0.5)
    assert meter.generation_estimate("m", None) == 256
    assert meter.generation_estimate("m", 100, 2) == 200
    meter.finish(meter.arrive("m", "t", 1, 1, n=2), 1, 40)  # 20 per choice
    assert meter.generation_estimate("m", None) == 20
    meter.finish(meter.arrive("m", "t", 1, 1), 1, 60)
    assert meter.generation_estimate("m", None) == 40
    assert meter.generation_estimate("m", 10, 3) == 30
    meter.abort(meter.arrive("m", "t", 1, 1))  # a cut-short request teaches nothing
    assert meter.generation_estimate("m", None) == 40


def test_label_bound() -> None:
    bound = LabelBound(2)
    assert [bound(v) for v in ["a", "b", "c", "a", "x" * 200, "b"]] == ["a", "b", "other", "a", "other", "b"]
    assert LabelBound(5)("bad\nvalue") == "other"
