"""The simulator: event-model invariants, determinism, a small trace end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from scaler.metadata import parse
from scaler.window import evaluate
from tuning import simulate as cli
from tuning.engine import SimConfig, simulate
from tuning.errors import ProfileFileError, TraceError
from tuning.hpa import HpaSettings
from tuning.metrics import Slo, summarize
from tuning.policies import (
    ConcurrencyPolicy,
    FixedPolicy,
    Policy,
    PrometheusRatePolicy,
    RequestRatePolicy,
    Second,
    TokenPolicy,
)
from tuning.replica import (
    DONE,
    DROPPED,
    PENDING,
    REJECTED,
    ReplicaProfile,
    load_profile,
    saturated_throughput,
)
from tuning.simulate_options import build_parser
from tuning.trace import AZURE_ATTRIBUTION, Trace, load_csv, load_sample

FAST = ReplicaProfile(cold_start_s=20.0)


def synthetic(n: int = 400, seconds: float = 200.0, seed: int = 3) -> Trace:
    """A burst in the middle of a steady stream."""
    rng = np.random.default_rng(seed)
    steady = np.sort(rng.uniform(0, seconds, n // 2))
    burst = np.sort(rng.uniform(seconds / 3, seconds / 3 + 20, n - n // 2))
    arrival = np.sort(np.concatenate([steady, burst]))
    prompt = rng.integers(0, 3000, n)
    generated = rng.integers(0, 300, n)
    return Trace(arrival - arrival[0], prompt, generated, "synthetic")


class Recorder(Policy):
    """Wraps a policy and keeps every second it observed."""

    def __init__(self, inner: Policy) -> None:
        super().__init__(inner.target)
        self.inner = inner
        self.name = inner.name
        self.needs_records = True
        self.seconds: list[Second] = []

    def observe(self, second: Second) -> None:
        self.seconds.append(second)
        self.inner.observe(second)

    def value(self, now_s: float, in_flight: int) -> float:
        return self.inner.value(now_s, in_flight)


def five_counters(second: Second) -> list[tuple[int, ...]]:
    """The served and arrived prompt and generated tokens and the requests ended of the
    second's records: the sidecars' summed (``Flushes.totals``), the gateway's."""
    out: list[tuple[int, ...]] = [
        tuple(m.as_list()[:5]) for rec in second.records for m in rec.models.values()
    ]
    if second.flushes is not None:
        out.extend(second.flushes.totals.values())
    return out


def token_policy(capacity: float = 4000.0, **extra: str) -> TokenPolicy:
    return TokenPolicy(parse({"tokensPerSecondPerReplica": str(capacity), **extra}, "ns", "llm"))


@pytest.mark.parametrize("routing", ["least-requests", "round-robin", "least-tokens"])
@pytest.mark.parametrize("policy_name", ["token", "rps", "concurrency", "prometheus"])
def test_no_request_lost_and_work_conserved(policy_name, routing):
    trace = synthetic()
    inner: Policy = {
        "token": token_policy(),
        "rps": RequestRatePolicy(1.5),
        "concurrency": ConcurrencyPolicy(10),
        "prometheus": PrometheusRatePolicy(3000.0),
    }[policy_name]
    policy = Recorder(inner)
    config = SimConfig(
        FAST,
        HpaSettings(min_replicas=1, max_replicas=6).with_scale_down_window(30),
        timeout_s=30,
        routing=routing,
    )
    result = simulate(trace, policy, config)
    r = result.requests

    # every request ends one way or another, and times are ordered
    assert not (r.status == PENDING).any()
    done = r.status == DONE
    assert done.sum() + (r.status == REJECTED).sum() + (r.status == DROPPED).sum() == len(trace)
    assert (r.first_token[done] >= r.arrival[done]).all()
    assert (r.finish[done] >= r.first_token[done]).all()

    # the sidecars' counters: served == what completed requests hold; arrived estimates
    # are corrected to the same totals by the end
    counters = [c for s in policy.seconds for c in five_counters(s)]
    served_prompt = sum(c[0] for c in counters)
    served_gen = sum(c[1] for c in counters)
    assert served_prompt == int(r.prompt[done].sum())
    assert served_gen == int(r.generated[done].sum())
    assert sum(c[2] for c in counters) == served_prompt
    assert sum(c[3] for c in counters) == served_gen
    assert sum(c[4] for c in counters) == int(done.sum() + (r.status == DROPPED).sum())
    assert sum(s.arrivals for s in policy.seconds) == len(trace)
    last = {}  # each sidecar's last gauges: (in flight, waiting, backlogs)
    for s in policy.seconds:
        for rec in s.records:
            if rec.models:
                m = rec.models["model"]
                last[rec.sidecar] = (m.inflight, m.waiting)
        for name, _, gauges in s.flushes.sidecars if s.flushes else []:
            if gauges:
                last[name] = gauges["model"][:2]
    assert all(g == (0, 0) for g in last.values())

    # replicas within min/max, ready never above existing
    tl = result.timeline
    assert tl["pods"].min() >= 1 and tl["pods"].max() <= 6
    assert (tl["ready"] <= tl["pods"]).all()
    assert result.pod_seconds > 0


def test_a_saturated_replica_still_shows_demand():
    """The throughput trap: the served rate cannot exceed capacity, the token policy's value can."""
    trace = synthetic(n=600, seconds=120)
    settings = parse({"tokensPerSecondPerReplica": "3000", "panicThreshold": "1000"}, "ns", "llm")
    config = SimConfig(FAST, HpaSettings(min_replicas=1, max_replicas=1), timeout_s=600)
    token = simulate(trace, TokenPolicy(settings), config)
    prom = simulate(trace, PrometheusRatePolicy(settings.target), config)
    sp, sg = saturated_throughput(FAST, trace.prompt, trace.generated)
    assert prom.syncs["value"].max() <= (sp + sg) * 1.25
    assert token.syncs["value"].max() > (sp + sg) * 2


def test_token_policy_answers_with_the_scalers_evaluate():
    policy = token_policy(2000.0)
    result = simulate(synthetic(), policy, SimConfig(FAST, HpaSettings(max_replicas=4)))
    last_sync = result.syncs["t"][-1]
    expected = evaluate(policy.series, policy.settings, int(last_sync * 1000)).value
    assert result.syncs["value"][-1] == pytest.approx(expected)
    assert policy.series.entries > 0
    assert len(policy.series.sidecars) >= 1


def test_scales_up_after_cold_start_and_back_down():
    trace = synthetic(n=800, seconds=300)
    config = SimConfig(FAST, HpaSettings(min_replicas=1, max_replicas=8).with_scale_down_window(30))
    result = simulate(trace, token_policy(3000.0), config)
    tl = result.timeline
    assert tl["pods"].max() > 1
    first_up = np.argmax(tl["pods"] > 1)
    # no extra pod is ready before its cold start has passed
    assert (tl["ready"][: first_up + int(FAST.cold_start_s) - 1] <= 1).all()
    assert tl["pods"][-1] < tl["pods"].max()


def test_deterministic_with_a_seed():
    base = load_sample()
    a = base.transformed(scale=2.5, seed=7)
    b = base.transformed(scale=2.5, seed=7)
    c = base.transformed(scale=2.5, seed=8)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt, b.prompt)
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    config = SimConfig(FAST, HpaSettings(max_replicas=10))
    s1 = summarize(simulate(a, token_policy(), config), Slo())
    s2 = summarize(simulate(b, token_policy(), config), Slo())
    assert s1 == s2


def test_trace_transforms():
    base = load_sample()
    assert len(base) == 476 and base.attribution == AZURE_ATTRIBUTION
    assert base.arrival_s[0] == 0 and (np.diff(base.arrival_s) >= 0).all()
    fast = base.transformed(speedup=2)
    assert fast.duration_s == pytest.approx(base.duration_s / 2)
    assert len(base.transformed(scale=3)) == 3 * len(base)
    double = base.transformed(scale=2, seed=1)
    assert double.prompt.sum() == 2 * base.prompt.sum()


def test_trace_errors_name_file_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,10,5\n1.5,x,3\n")
    with pytest.raises(TraceError, match=r"t\.csv:3"):
        load_csv(path)
    path.write_text("when,prompt\n1,2\n")
    with pytest.raises(TraceError, match="timestamp column"):
        load_csv(path)
    path.write_text("timestamp,prompt_tokens,completion_tokens\n2.5,100,10\n0.5,50,5\n")
    trace = load_csv(path)
    assert trace.arrival_s.tolist() == [0.0, 2.0] and trace.prompt.tolist() == [50, 100]


def test_profile_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "p.json"
    replica = {
        "step_base_s": 0.02,
        "step_per_seq_s": 0.001,
        "prefill_tokens_per_s": 3000,
        "max_concurrency": 8,
    }
    doc = {
        "kind": "token-scaler/replica-profile",
        "version": 1,
        "model": "m",
        "replica": replica,
        "recommendation": {"tokensPerSecondPerReplica": 1234, "promptWeight": 1, "generationWeight": 4},
    }
    path.write_text(json.dumps(doc))
    profile = load_profile(path)
    assert profile.max_concurrency == 8 and profile.tokens_per_second_per_replica == 1234
    assert profile.generation_weight == 4 and profile.cold_start_s == 120.0
    path.write_text(json.dumps({**doc, "replica": {**replica, "prefill_tokens_per_s": -1}}))
    with pytest.raises(ProfileFileError, match="prefill_tokens_per_s"):
        load_profile(path)
    path.write_text("{}")
    with pytest.raises(ProfileFileError, match="not a replica profile"):
        load_profile(path)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = cli.main(
        [
            "--policies", "token,rps,concurrency,prometheus,foresight",
            "--cold-start", "30",
            "--max-replicas", "8",
            "--metadata", "windowSeconds=30",
            "--json", str(out),
            "--sweep",
            "--sweep-windows", "30",
            "--sweep-headroom-range", "1,3",
            "--sweep-panic", "6:2,off",
            "--sweep-scale-down-windows", "60",
            "--sweep-rps-windows", "60",
            "--sweep-rate-windows", "60",
            "--slo-goal", "0.8",
            "--tpot-slo", "0.5",
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "Splitwise" in text  # the shipped sample's attribution
    for name in ("token", "rps", "concurrency", "prometheus", "foresight"):
        assert f"\n{name} " in text
    report = json.loads(out.read_text())
    assert report["trace"]["requests"] == 476
    assert report["token_metadata"]["windowSeconds"] == "30"
    assert [p["policy"] for p in report["policies"]] == [
        "token",
        "rps",
        "concurrency",
        "prometheus",
        "foresight",
    ]
    sweep = report["sweep"]
    # every policy searched, the bounds beside them, fixed by its replica count
    assert [p["policy"] for p in sweep["policies"]] == [
        "token", "rps", "concurrency", "prometheus", "foresight", "foresight-requests", "fixed",
    ]  # fmt: skip
    by_name = {p["policy"]: p for p in sweep["policies"]}
    # token: two panic variants, each bisected; the others one family each
    assert {pt["settings"]["panic"] for pt in by_name["token"]["points"]} == {"6@2", "off"}
    # headroom within the range, or its top doubled where a level was not reached at 3
    rps = by_name["rps"]["points"]
    assert all(float(pt["settings"]["headroom"]) >= 1 for pt in rps)
    wider = {float(pt["settings"]["headroom"]) for pt in rps if float(pt["settings"]["headroom"]) > 3}
    at_top = next(pt["slo"] for pt in rps if float(pt["settings"]["headroom"]) == 3)
    assert wider <= {6.0, 12.0, 24.0, 48.0} or at_top < 0.95
    # fixed is searched over every count, so the cheapest reaching a level is one count
    # more than the most expensive not reaching it
    fixed = by_name["fixed"]
    reached = fixed["cheapest"]["0.8"]
    if reached is not None:
        n = int(reached["settings"]["replicas"])
        below = [pt for pt in fixed["points"] if int(pt["settings"]["replicas"]) == n - 1]
        assert n == 1 or (below and below[0]["slo"] < 0.8)
    assert "GPU-h for 95%" in text and "\nforesight-requests " in text
    assert "at 80 %: " in text


def test_simulate_finds_the_same_runs_in_worker_processes(tmp_path):
    """Runs and sweep families run in workers come back in the order they were planned, each
    family with its runs in the order its bisection made them: the report is the same as in
    one process."""
    reports = []
    for jobs in ("1", "3"):
        out = tmp_path / f"jobs{jobs}.json"
        code = cli.main(
            ["--policies", "token,rps", "--cold-start", "30", "--max-replicas", "6", "--quiet",
             "--json", str(out), "--sweep", "--jobs", jobs, "--sweep-windows", "30,60",
             "--sweep-headroom-range", "1,2", "--sweep-panic", "off", "--sweep-scale-down-windows", "60,120",
             "--sweep-rps-windows", "60"]
        )  # fmt: skip
        assert code == 0
        reports.append(json.loads(out.read_text()))
    # the policies' plain runs, in workers too: the same but for the CPU they took
    plain = [[{k: v for k, v in p.items() if k != "cpu_s"} for p in r["policies"]] for r in reports]
    assert plain[0] == plain[1] and [p["policy"] for p in plain[0]] == ["token", "rps"]
    assert reports[0]["timelines"] == reports[1]["timelines"]
    one, three = (r["sweep"] for r in reports)
    assert one == three
    token = next(p for p in one["policies"] if p["policy"] == "token")
    families = {
        (pt["settings"]["windowSeconds"], pt["settings"]["scaleDownWindow"]) for pt in token["points"]
    }
    assert families == {("30", "60"), ("30", "120"), ("60", "60"), ("60", "120")}


def test_cli_plots(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sim.png"
    code = cli.main(
        ["--policies", "token,rps", "--plot", str(png), "--quiet", "--sweep", "--sweep-windows", "30",
         "--sweep-headroom-range", "1,2", "--sweep-panic", "off", "--sweep-scale-down-windows", "60",
         "--sweep-rps-windows", "60", "--max-replicas", "6"]
    )  # fmt: skip
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sim-sweep.png").is_file()


def test_fixed_replicas_never_scale():
    config = cli.fixed_config(SimConfig(FAST, HpaSettings()), 3)
    result = simulate(synthetic(n=600, seconds=100), FixedPolicy(3), config)
    assert set(result.timeline["pods"].tolist()) == {3} and set(result.timeline["ready"].tolist()) == {3}
    assert result.scale_ups == result.scale_downs == 0
    assert result.pod_seconds == pytest.approx(3 * result.horizon_s)


def test_cli_rejects_bad_metadata():
    from token_scaler.errors import ConfigError

    with pytest.raises(ConfigError, match="headroom"):
        cli.main(["--metadata", "headroom=0.5", "--quiet"])


def test_unknown_policy_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["--policies", "token,magic", "--quiet"])


def test_tpot_is_the_mean_gap_after_the_first_token():
    from tuning.metrics import time_per_output_token
    from tuning.replica import Requests

    r = Requests.of([0.0, 0.0, 0.0], [10, 10, 10], [11, 1, 0])
    r.first_token[:] = [1.0, 1.0, 1.0]
    r.finish[:] = [3.0, 1.0, 1.0]
    assert time_per_output_token(r).tolist() == [0.2, 0.0, 0.0]
    slo = Slo(ttft_s=2.0, tpot_s=0.1)
    assert slo.describe() == "TTFT <= 2s and TPOT <= 100ms"


def test_least_tokens_routing_spreads_tokens_not_requests():
    """One pod gets a request of 30,000 prompt tokens; with least-requests the next short
    request can land behind it, with least-tokens it goes to the other pod."""
    arrival = np.array([0.0, 0.01, 0.02])
    trace = Trace(arrival, np.array([30000, 100, 100]), np.array([10, 10, 10]), "two pods")
    hpa = HpaSettings(min_replicas=2, max_replicas=2)
    ttft = {}
    for routing in ("least-requests", "least-tokens"):
        config = SimConfig(FAST, hpa, initial_replicas=2, routing=routing)
        r = simulate(trace, FixedPolicy(2), config).requests
        ttft[routing] = (r.first_token - r.arrival).tolist()
    # least-requests: request 1 goes to pod 1, request 2 back to pod 0 behind the long prompt
    assert ttft["least-requests"][2] > 4.0
    assert max(ttft["least-tokens"][1:]) < 1.0


def test_foresight_sees_the_demand_ahead():
    from tuning.policies import ForesightPolicy

    arrival = np.array([100.0, 100.5, 101.0])
    policy = ForesightPolicy(1000.0, arrival, np.array([3000.0, 3000.0, 3000.0]), lookahead_s=50, smooth_s=10)
    assert policy.value(40.0, 0) == 0.0  # 60 s ahead: not yet seen
    assert policy.value(60.0, 0) == pytest.approx(900.0)  # 9,000 tokens in a 10 s mean
    assert policy.value(101.0, 0) == pytest.approx(300.0)  # only the last request is ahead
    assert policy.value(102.0, 0) == 0.0


def test_search_finds_the_smallest_headroom_and_the_fewest_replicas():
    from tuning.registry import Calibration
    from tuning.search import Search

    trace = synthetic()
    cal = Calibration(trace, 4000.0, 1.0, 1.0, 32, {"tokensPerSecondPerReplica": "4000"}, 60)
    calls = []

    def fake(policy, config):
        # attainment grows with the target's inverse; GPU-hours with it too
        h = 4000.0 / policy.target if policy.name != "token" else policy.settings.headroom
        calls.append(h)
        return {"gpu_hours": h, "slo_both": min(1.0, 0.5 * h)}

    search = Search(cal, SimConfig(FAST), fake, [0.8, 0.9], (0.5, 4.0), [60.0])
    best = search.policy("prometheus", [{}])
    # the smallest headroom reaching 0.8 is 1.6, 0.9 is 1.8: bisection gets within 2 %
    assert 1.6 <= best.cheapest(0.8).gpu_hours <= 1.6 * 1.02
    assert 1.8 <= best.cheapest(0.9).gpu_hours <= 1.8 * 1.02
    assert len(calls) < 25
    # a policy that reaches a level only beyond the range's top: the top doubles until it does
    calls.clear()
    late = Search(
        cal,
        SimConfig(FAST),
        lambda p, c: fake(p, c) | {"slo_both": min(1.0, 0.04 * 4000.0 / p.target)},
        [0.8],
        (0.5, 4.0),
        [60.0],
    )
    assert 20 <= late.policy("prometheus", [{}]).cheapest(0.8).gpu_hours <= 20 * 1.02
    assert max(calls) == 32.0
    # ... but not while its fleet no longer grows (maxReplicas reached): wider is no use
    calls.clear()
    capped = Search(
        cal,
        SimConfig(FAST),
        lambda p, c: fake(p, c) | {"gpu_hours": min(5.0, 4000.0 / p.target), "slo_both": 0.5},
        [0.8],
        (0.5, 4.0),
        [60.0],
    )
    assert capped.policy("prometheus", [{}]).cheapest(0.8) is None and max(calls) == 16.0
    fixed = search.fixed(lambda n: {"gpu_hours": float(n), "slo_both": min(1.0, n / 10)}, 40)
    assert fixed.cheapest(0.8).settings == {"replicas": "8"}
    assert fixed.cheapest(0.9).settings == {"replicas": "9"}
    unreachable = search.fixed(lambda n: {"gpu_hours": float(n), "slo_both": 0.5}, 4)
    assert unreachable.cheapest(0.8) is None and len(unreachable.runs) == 1


def test_verdict_says_who_wins_in_words():
    from tuning.compare import Best, Run, verdict

    def best(gpu: float) -> Best:
        return Best([Run("x", {}, gpu, 0.95, {})])

    results = {"token": best(9.0), "rps": best(10.0), "fixed": best(8.0), "foresight": best(7.5)}
    lines = verdict(results, 0.9, ("token", "rps"), "foresight")
    assert lines[0] == "at 90 %: the cheapest autoscaler is token (9.00 GPU-h)"
    assert "FIXED deployment beats every autoscaler: 8.00 GPU-h (+12.5 % for token)" in lines[1]
    assert "token vs rps: -10.0 %" in lines[2]
    assert "foresight bound (7.50 GPU-h): token +20.0 %, rps +33.3 %" in lines[3]
    results["fixed"] = best(12.0)
    assert (
        "autoscaling beats fixed (12.00 GPU-h) by 25.0 %"
        in verdict(results, 0.9, ("token", "rps"), "foresight")[1]
    )


def test_verdict_notes_a_cheapest_family_at_the_longest_scale_down_window():
    from tuning.compare import Best, Run, verdict

    def family(window: str, gpu: float) -> list[Run]:
        return [
            Run("x", {"scaleDownWindow": window, "headroom": h}, g, a, {})
            for h, g, a in (("1", gpu, 0.85), ("2", gpu + 2, 0.95))
        ]

    token = Best(family("300", 10.0) + family("1800", 8.0))
    results = {"token": token, "fixed": Best([Run("fixed", {"replicas": "9"}, 9.0, 0.95, {})])}
    # token's cheapest family at 90 % is the 1800 s one: 8 + 0.05 / 0.1 * 2 = 9.0
    found = token.fitted_family(0.9)
    assert found is not None and found[1] == {"scaleDownWindow": "1800"}
    assert found[0] == pytest.approx(9.0)
    lines = verdict(results, 0.9, ("token",), "foresight")
    assert any("longest scale-down window searched (1800 s)" in line for line in lines)
    # the cheaper family at the shorter window: no note
    results["token"] = Best(family("300", 6.0) + family("1800", 8.0))
    assert not any("longest" in line for line in verdict(results, 0.9, ("token",), "foresight"))
    # one window searched: nothing to widen it against
    results["token"] = Best(family("1800", 8.0))
    assert not any("longest" in line for line in verdict(results, 0.9, ("token",), "foresight"))


def test_kv_cache_limit_holds_requests_until_their_context_fits():
    # three requests of 6,000 context tokens each into a replica of 10,000: one at a time
    arrival = np.array([0.0, 0.0, 0.0])
    trace = Trace(arrival, np.array([1000, 1000, 1000]), np.array([5000, 5000, 5000]), "kv")
    hpa = HpaSettings(min_replicas=1, max_replicas=1)
    limited = SimConfig(replace(FAST, kv_cache_tokens=10_000), hpa, initial_replicas=1, timeout_s=3600)
    r = simulate(trace, FixedPolicy(1), limited).requests
    assert (r.status == DONE).all()
    order = np.argsort(r.first_token)
    # each starts only after the one before it finished
    assert all(r.first_token[order[k + 1]] >= r.finish[order[k]] for k in range(2))
    free = simulate(trace, FixedPolicy(1), replace(limited, replica=FAST)).requests
    assert free.finish.max() < r.finish.max() / 2  # without the limit all three share the batch
    # a request larger than the whole cache still runs, alone
    big = Trace(np.array([0.0]), np.array([20_000]), np.array([10]), "big")
    assert (simulate(big, FixedPolicy(1), limited).requests.status == DONE).all()


def test_predictive_token_policy_wakes_before_a_ramp_it_saw_yesterday():
    """One hour whose second half runs at 8x the first, and a history saying yesterday did
    the same: with a 10-minute cold start, the forecast (scaler.forecast, the scaler's own
    code) has pods ready at the ramp; the reactive policy starts them when it arrives."""
    from scaler.forecast import MinuteCounts

    rng = np.random.default_rng(5)
    low = np.sort(rng.uniform(0, 1800, 900))  # 0.5 req/s
    high = np.sort(rng.uniform(1800, 3600, 7200))  # 4 req/s
    arrival = np.concatenate([low, high])
    trace = Trace(arrival, np.full(len(arrival), 1000), np.full(len(arrival), 100), "ramp")
    profile = replace(FAST, cold_start_s=600.0)
    config = SimConfig(profile, HpaSettings(min_replicas=1, max_replicas=20), initial_replicas=1)
    sp, sg = saturated_throughput(profile, trace.prompt, trace.generated)
    meta = {"tokensPerSecondPerReplica": f"{sp + sg:.0f}", "leadSeconds": "720"}

    def minute(rate_rps: float) -> MinuteCounts:
        prompt, generated = rate_rps * 60 * 1000.0, rate_rps * 60 * 100.0
        return MinuteCounts(prompt, generated, prompt, generated)

    def with_yesterday(policy: TokenPolicy) -> TokenPolicy:
        day = 24 * 60
        for m in range(-90, 60):  # yesterday, from 90 minutes before this hour to its end
            policy.history[m - day] = minute(0.5 if m < 30 else 4.0)
        for m in range(-60, 0):  # the hour before this one, as quiet as yesterday's
            policy.history[m] = minute(0.5)
        return policy

    reactive = with_yesterday(token_policy(sp + sg, leadSeconds="720"))
    predictive = with_yesterday(TokenPolicy(parse({**meta, "predictive": "true"}, "ns", "llm")))
    slo = Slo(ttft_s=2.0, tpot_s=1.0)
    late = summarize(simulate(trace, reactive, config), slo)
    early_run = simulate(trace, predictive, config)
    early = summarize(early_run, slo)
    ready = early_run.timeline["ready"]
    # the forecast asked for pods about leadSeconds before the ramp: ready when it comes
    assert ready[1800] > ready[1100]
    assert early["slo_both"] > late["slo_both"] + 0.1


def test_the_token_policy_wakes_from_zero_on_the_gateways_records():
    """At zero pods no sidecar reports; the gateway holding the requests does (its record says
    their arrival, and takes it back when they leave), so KEDA's IsActive turns true."""
    trace = synthetic(n=200, seconds=200)
    hpa = HpaSettings(min_replicas=0, max_replicas=4, polling_s=5.0)
    config = SimConfig(FAST, hpa, initial_replicas=0, timeout_s=120.0)
    policy = Recorder(token_policy(4000.0))
    result = simulate(trace, policy, config)
    r = result.requests
    assert (r.status == DONE).all()  # every request waited for the first pod and was served
    gateway = [rec for s in policy.seconds for rec in s.records if rec.sidecar == "gateway"]
    assert gateway and all(rec.role == "gateway" for rec in gateway)
    # over their lives the gateway's counts sum to zero: the sidecars count every token once
    assert sum(rec.models["model"].arrived_prompt for rec in gateway) == 0
    assert sum(rec.models["model"].arrived_generation for rec in gateway) == 0
    assert not any(rec.sidecar != "gateway" for s in policy.seconds for rec in s.records)
    sidecars = [s.flushes.totals["model"] for s in policy.seconds if s.flushes and s.flushes.totals]
    assert sum(c[2] for c in sidecars) == int(r.prompt.sum())


def test_warm_up_plays_the_traces_end_first():
    trace = Trace(np.array([0.0, 10.0, 50.0, 90.0, 100.0]), np.arange(5), np.arange(5) * 10, "t")
    warm = trace.with_warm_up(20.0)
    # the last 20 s before the end (the arrival at 90) at 10, then the whole trace from 20 on
    assert warm.arrival_s.tolist() == [10.0, 20.0, 30.0, 70.0, 110.0, 120.0]
    assert warm.prompt.tolist() == [3, 0, 1, 2, 3, 4]
    assert warm.generated.tolist() == [30, 0, 10, 20, 30, 40]
    assert trace.with_warm_up(0.0) is trace
    assert len(trace.with_warm_up(1000.0)) == 9  # at most the whole trace again, but its end


def test_warm_up_is_not_counted():
    """GPU-hours and attainment count from the end of the warm-up: a fixed deployment costs
    its replicas over the measured span only, and only the requests arriving in it count."""
    trace = synthetic()
    config = SimConfig(FAST, HpaSettings(min_replicas=3, max_replicas=3), 3, margin_s=30.0)
    plain = summarize(simulate(trace, FixedPolicy(3), config), Slo())
    warm = summarize(
        simulate(trace.with_warm_up(60.0), FixedPolicy(3), replace(config, measure_from_s=60.0)), Slo()
    )
    assert warm["requests"] == len(trace)  # the replayed tail is not counted
    assert plain["horizon_s"] == pytest.approx(warm["horizon_s"] - 60.0)
    assert warm["replica_hours"] == pytest.approx(plain["replica_hours"], abs=0.002)
    assert warm["replica_hours"] == pytest.approx(3 * (warm["horizon_s"] - 60.0) / 3600, abs=0.002)


def test_cli_warm_up_flag(capsys):
    assert cli.main(["--policies", "rps", "--warm-up", "120", "--quiet", "--cold-start", "20"]) == 0
    assert "warm-up 120s" in capsys.readouterr().out


def test_fitted_reads_the_level_off_a_monotone_fit_not_a_lucky_run():
    from tuning.compare import Best, Run, _monotone

    assert _monotone([0.5, 0.7, 0.6, 0.9]) == pytest.approx([0.5, 0.65, 0.65, 0.9])
    assert _monotone([3.0, 2.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])

    def run(h, gpu, att, window="60"):
        return Run("rps", {"window": window, "headroom": f"{h:g}"}, gpu, att, {})

    best = Best(
        [
            run(2.0, 10.0, 0.80),
            run(2.2, 11.0, 0.91),  # lucky: its neighbours above it in headroom attain less
            run(2.4, 12.0, 0.87),
            run(2.6, 13.0, 0.89),
            run(2.8, 14.0, 0.93),
        ]
    )
    assert best.cheapest(0.9).gpu_hours == 11.0
    # fitted attainment: 0.80, 0.89, 0.89, 0.89, 0.93 (the three pooled); gpu already monotone;
    # 0.9 is crossed between 13.0 (0.89) and 14.0 (0.93): 13.0 + 0.01 / 0.04 = 13.25
    assert best.fitted(0.9) == pytest.approx(13.25)
    # reached at the family's lowest run: that run's GPU-hours; never reached: None
    assert best.fitted(0.8) == pytest.approx(10.0)
    assert best.fitted(0.95) is None
    # the policy's figure is its cheapest family's
    best.runs += [run(2.0, 9.0, 0.85, "30"), run(2.4, 10.0, 0.95, "30")]
    assert best.fitted(0.9) == pytest.approx(9.5)
    # a fixed deployment's replica counts are not interpolated
    fixed = Best([Run("fixed", {"replicas": str(n)}, float(n), a, {}) for n, a in [(3, 0.85), (4, 0.92)]])
    assert fixed.fitted(0.9) == 4.0


def test_the_sweep_pairs_a_size_window_with_the_first_margin_only() -> None:
    """A sized window's demand is its arrivals whatever the margin, so the sweep does not run
    it once per margin; the size windows are read as the metadata reads them."""
    ns = build_parser().parse_args(
        [
            "--trace",
            "t.csv",
            "--sweep-windows",
            "30",
            "--sweep-panic",
            "off",
            "--sweep-burst",
            "off",
            "--sweep-size-windows",
            "0,3600",
        ]
    )
    variants = cli._variants("token", ns, sweep=True)
    assert [(v["arrivalMargin"], v.get("sizeWindowSeconds")) for v in variants] == [
        ("0", None),
        ("off", None),
        ("0", "3600"),
    ]
    for bad in ("90", "86460", "-60"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--trace", "t.csv", "--sweep-size-windows", f"0,{bad}"])
