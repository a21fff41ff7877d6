"""The window's ingest and evaluate give the answers of the plain reference
(``tests/scaler/window_reference.py``) for random record streams and settings."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from scaler.metadata import ScalerSettings
from scaler.series import WorkloadSeries
from scaler.size import Size
from scaler.window import evaluate
from tests.scaler.window_reference import RefSeries, ref_evaluate
from token_scaler.record import GATEWAY, SIDECAR, ModelCounts, Record, TenantCounts

T0 = 1_700_000_000
MODELS = ("a", "b", "c")

counts = st.builds(
    ModelCounts,
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.integers(0, 20),
    st.integers(0, 9),
    st.integers(0, 9),
    arrived_requests=st.integers(-1, 12),  # -1: a gateway's take-back
    arrivals_known=st.sampled_from((True, True, True, False)),  # False: a writer from before ``ar``
)
# the arriving requests' size (``scaler.size``), None: the token rates alone
sizes = st.none() | st.builds(Size, st.sampled_from((0.3, 57.0, 1250.5)), st.just(60), st.just(100.0))
# (sidecar, seq step (0: a duplicate of the last seq), second offset, ms, interval s, models,
# gateway, stored late by this many seconds)
step = st.tuples(
    st.sampled_from(("s1", "s2", "s3", "g")),
    st.integers(0, 2),
    st.integers(0, 3),
    st.integers(0, 999),
    st.sampled_from((1, 1, 1, 2, 5)),
    st.dictionaries(st.sampled_from(MODELS), counts, max_size=3),
    st.one_of(st.integers(0, 40), st.just(1300)),  # 1300: older than the rings hold
)
scaler_settings = st.builds(
    lambda w, wp, hold, thr, pw, burst, q, look, model, margin: ScalerSettings(
        "ns/llm",
        130.0,
        window_s=w,
        panic_window_s=min(wp, w // 2),
        panic_hold_s=hold,
        panic_threshold=thr,
        prompt_weight=pw,
        burst_window_s=burst,
        burst_quantile=q,
        burst_lookback_s=look,
        model=model,
        arrival_margin=margin,
    ),
    st.integers(10, 120),
    st.integers(1, 20),
    st.integers(1, 30),
    st.sampled_from((1.5, 2.0, 3.0)),
    st.sampled_from((1.0, 0.25, 0.3)),  # 0.3: weighted sums round, their order of additions counts
    st.sampled_from((0, 0, 5, 30)),
    st.sampled_from((0.5, 0.9, 1.0)),
    st.sampled_from((60, 300, 1200)),
    st.sampled_from((None, "a", "b")),
    st.sampled_from((0.0, 0.0, 0.2, math.inf)),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(step, min_size=1, max_size=120),
    st.lists(st.tuples(scaler_settings, st.integers(0, 1500), sizes), min_size=1, max_size=4),
    st.integers(-5, 1500),
)
def test_evaluate_matches_the_reference(
    steps: list[tuple[str, int, int, int, int, dict[str, ModelCounts], int]],
    checks: list[tuple[ScalerSettings, int, Size | None]],
    gap: int,
) -> None:
    new, ref = WorkloadSeries(), RefSeries()
    seqs: dict[str, int] = {}
    sec = T0
    for i, (sidecar, seq_step, advance, ms, interval_s, models, late) in enumerate(steps):
        sec += advance + (gap if i == len(steps) // 2 else 0)  # one gap mid-stream
        seq = seqs.get(sidecar, 0) + seq_step
        seqs[sidecar] = seq
        ts = (sec - late) * 1000 + ms
        tenants = {"t": {m: TenantCounts(c.served_prompt, c.served_generation, 1) for m, c in models.items()}}
        record = Record(
            sidecar, seq, ts, interval_s * 1000, models, tenants, role=GATEWAY if sidecar == "g" else SIDECAR
        )
        entry = f"{sec * 1000 + ms}-0"
        new.clock_sec = ref.clock_sec = sec - late // 2
        assert new.add(record, entry) == ref.add(record, entry)
        if i % 7 == 3:  # evaluations between entries read the rings while they are written
            for s, after, size in checks:
                assert evaluate(new, s, (sec + after % 90) * 1000, size) == ref_evaluate(
                    ref, s, (sec + after % 90) * 1000, size
                )
    for field in ("first_sec", "entries", "past_version", "too_old", "clamped", "duplicates"):
        assert getattr(new, field) == getattr(ref, field), field
    assert list(new.tenant_log) == list(ref.tenant_log)
    assert new.sidecars == ref.sidecars
    for s, after, size in checks:
        now_ms = (sec + after) * 1000 + 500
        assert evaluate(new, s, now_ms, size) == ref_evaluate(ref, s, now_ms, size)
        for model in (None, *MODELS):
            got, want = new.ring(model), ref.rings.get(model)
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                lo = sec - 1300
                assert got.window(lo, sec + 2).tolist() == want.window(lo, sec + 2).tolist()
                assert got.rows(lo, sec + 2) == want.window(lo, sec + 2).T.tolist()
