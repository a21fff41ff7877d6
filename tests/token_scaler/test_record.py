"""The stream record contract: codec, bad entries, and the append script on a real Redis."""

from __future__ import annotations

import contextlib
import json

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from token_scaler.errors import RecordError
from token_scaler.record import (
    APPEND_SCRIPT,
    MODEL_FIELDS,
    ModelCounts,
    Record,
    TenantCounts,
    append_args,
    decode,
    entry_time_ms,
    seq_key,
    stream_key,
    validate_workload,
)

counts = st.integers(min_value=-(10**9), max_value=10**9)
gauges = st.integers(min_value=0, max_value=10**9)
model_counts = st.builds(
    ModelCounts, counts, counts, counts, counts, gauges, gauges, gauges, gauges, gauges, counts
)
names = st.text(min_size=1, max_size=20)
records = st.builds(
    Record,
    sidecar=st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True),
    seq=st.integers(min_value=0, max_value=2**40),
    ts_ms=st.integers(min_value=0, max_value=2**45),
    interval_ms=st.integers(min_value=1, max_value=10**6),
    models=st.dictionaries(names, model_counts, max_size=5),
    tenants=st.dictionaries(
        names, st.dictionaries(names, st.builds(TenantCounts, counts, counts, gauges), max_size=3), max_size=5
    ),
)


@given(records)
def test_encode_decode_round_trip(record: Record) -> None:
    encoded = record.encode()
    as_bytes = {k.encode(): v.encode() for k, v in encoded.items()}
    decoded = decode(as_bytes)
    # an empty per-tenant mapping is dropped on encode only when all tenants are empty
    assert decoded.models == record.models
    assert decoded.tenants == {t: m for t, m in record.tenants.items()}
    assert (decoded.sidecar, decoded.seq, decoded.ts_ms, decoded.interval_ms) == (
        record.sidecar,
        record.seq,
        record.ts_ms,
        record.interval_ms,
    )


@given(
    st.dictionaries(st.sampled_from(["v", "sc", "seq", "ts", "dt", "m", "t", "x"]), st.binary(max_size=40))
)
def test_decode_never_raises_anything_but_record_error(fields: dict[str, bytes]) -> None:
    with contextlib.suppress(RecordError):
        decode(fields)


def _good() -> dict[str, str]:
    return Record("pod-a", 1, 1000, 1000, {"m": ModelCounts(1, 2, 3, 4, 1, 0, 0, 0, 0)}).encode()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("v", "2", "unsupported schema version"),
        ("sc", "pod a", "[A-Za-z0-9._-]"),
        ("seq", "-1", ">= 0"),
        ("ts", "soon", "expected an integer"),
        ("dt", "0", ">= 1"),
        ("m", "{", "not valid JSON"),
        ("m", "[]", "expected a JSON object"),
        ("m", '{"m": [1, 2]}', "list of 9 or 10 integers"),
        ("m", '{"m": [1, 2, 3, 4, 5, -1, 0, 0, 0]}', "gauge cannot be negative"),
        ("m", '{"m": [1.5, 2, 3, 4, 5, 1, 0, 0, 0]}', "expected an integer"),
        ("m", '{"m": [true, 2, 3, 4, 5, 1, 0, 0, 0]}', "expected an integer"),
        ("t", '{"a": [1]}', "expected a JSON object"),
    ],
)
def test_bad_fields_are_named(field: str, value: str, expected: str) -> None:
    fields = _good()
    fields[field] = value
    with pytest.raises(RecordError) as info:
        decode(fields)
    assert expected in str(info.value)
    assert info.value.field.startswith(field)


def test_missing_field_is_named() -> None:
    fields = _good()
    del fields["ts"]
    with pytest.raises(RecordError, match=r"'ts'.*missing"):
        decode(fields)


def test_extra_fields_and_items_are_ignored() -> None:
    fields = _good()
    fields["future"] = "x"
    fields["m"] = json.dumps({"m": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]})
    assert decode(fields).models["m"] == ModelCounts(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)


def test_arrived_requests_are_read_when_present_and_zero_when_not() -> None:
    fields = _good()
    fields["m"] = json.dumps({"m": [1, 2, 3, 4, 5, 6, 7, 8, 9]})  # a writer from before ``ar``
    old = decode(fields).models["m"]
    assert old.arrived_requests == 0 and not old.arrivals_known
    fields["m"] = json.dumps({"m": [1, 2, 3, 4, 5, 6, 7, 8, 9, -2]})  # a gateway's take-back
    back = decode(fields).models["m"]
    assert back.arrived_requests == -2 and back.arrivals_known
    fields["m"] = json.dumps({"m": [1, 2, 3, 4, 5, 6, 7, 8, 9, "3"]})
    with pytest.raises(RecordError, match="ar"):
        decode(fields)


@pytest.mark.parametrize("key", MODEL_FIELDS)
def test_counters_are_the_items_that_are_not_gauges(key: str) -> None:
    values = [0] * len(MODEL_FIELDS)
    values[MODEL_FIELDS.index(key)] = 3
    c = ModelCounts(*values)
    gauge = key in ("in", "wf", "bp", "bg")
    assert any(c.counters()) is not gauge
    c.clear_counters()
    assert c.as_list() == (values if gauge else [0] * len(MODEL_FIELDS))


def test_entry_time_is_clamped_to_the_stream_id() -> None:
    record = decode(_good())
    assert entry_time_ms(record, b"900-0") == 900  # clock ahead: Redis' time wins
    assert entry_time_ms(record, "5000-3") == 1000  # delivered late: the time it describes


@pytest.mark.parametrize("name", ["ns/llm", "a/b.c-d", "team-1/vllm-70b"])
def test_valid_workloads(name: str) -> None:
    assert validate_workload(name) == name


@pytest.mark.parametrize("name", ["llm", "NS/llm", "ns/", "/x", "ns/a/b", "ns/{x}", "-a/b"])
def test_invalid_workloads(name: str) -> None:
    with pytest.raises(ValueError):
        validate_workload(name)


def test_append_is_idempotent_per_sidecar(redis_url: str, workload: str) -> None:
    client = redis.Redis.from_url(redis_url)
    script = client.register_script(APPEND_SCRIPT)
    keys = [stream_key(workload), seq_key(workload, "pod-a")]
    batch = [
        Record("pod-a", seq, 1000 + seq, 1000, {"m": ModelCounts(seq, 0, 0, 0, 0, 0, 0, 0, 0)})
        for seq in (1, 2, 3)
    ]
    added, last_id, now_ms = script(keys=keys, args=append_args(batch, 1200))
    assert added == 3 and last_id and now_ms > 0
    # A retry of the same batch (its reply lost) plus one new entry adds only the new one.
    batch.append(Record("pod-a", 4, 1004, 1000, {}))
    added, _, _ = script(keys=keys, args=append_args(batch, 1200))
    assert added == 1
    entries = client.xrange(keys[0])
    assert [decode(fields).seq for _, fields in entries] == [1, 2, 3, 4]
    assert client.ttl(keys[1]) > 1200
    client.close()


def test_append_trims_by_time(redis_url: str, workload: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = stream_key(workload)
    for _ in range(200):
        client.xadd(key, {"old": "1"}, id="1-*")  # an entry from 1970
    script = client.register_script(APPEND_SCRIPT)
    script(keys=[key, seq_key(workload, "p")], args=append_args([Record("p", 0, 1, 1, {})], 60))
    # MINID ~ trims whole macro nodes (100 entries each): both full nodes of old entries go
    assert client.xlen(key) <= 101
    client.close()
