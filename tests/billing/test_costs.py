"""`token-scaler cost`: billing exports (AWS CUR, GCP) and token counts reconciled, by hand-computed cases."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from billing import costs
from tests.keda import FakeSidecar
from token_scaler.cli import main as cli
from token_scaler.errors import RowError

# Hour 13: instance 1.00 + its disk 0.20 + 1/24 of a daily 2.40 NAT = 1.30
# Hour 14: two instances 2.00 + 0.10 NAT = 2.10; the NAT's 22 other hours are billed, not counted.
AWS_HEADER = [
    "identity/LineItemId",
    "lineItem/LineItemType",
    "lineItem/UsageStartDate",
    "lineItem/UsageEndDate",
    "lineItem/ResourceId",
    "lineItem/UnblendedCost",
    "resourceTags/user:app",
]
AWS_ROWS = [
    ["a", "Usage", "2025-03-01T13:00:00Z", "2025-03-01T14:00:00Z", "i-0aaa", "1.00", "vllm"],
    ["b", "Usage", "2025-03-01T13:00:00Z", "2025-03-01T14:00:00Z", "vol-0bbb", "0.20", "vllm"],
    ["c", "Usage", "2025-03-01T14:00:00Z", "2025-03-01T15:00:00Z", "i-0aaa", "1.00", "vllm"],
    ["d", "Usage", "2025-03-01T14:00:00Z", "2025-03-01T15:00:00Z", "i-0ccc", "1.00", "vllm"],
    ["e", "Usage", "2025-03-01T13:00:00Z", "2025-03-01T14:00:00Z", "i-0zzz", "5.00", "other"],
    ["f", "Usage", "2025-03-01T00:00:00Z", "2025-03-02T00:00:00Z", "nat-1", "2.40", "vllm"],
]


def _labels(app: str) -> str:
    return json.dumps([{"key": "k8s-label/app", "value": app}, {"key": "env", "value": "prod"}])


GCP_HEADER = [
    "service.description",
    "usage_start_time",
    "usage_end_time",
    "labels",
    "cost",
    "currency",
    "credits",
]


def _gcp(service: str, start: str, end: str, app: str, cost: str, credits: str = "") -> list[str]:
    return [service, f"2025-03-01 {start} UTC", f"2025-03-{end} UTC", _labels(app), cost, "USD", credits]


GCP_ROWS = [
    # 1.20 with a -0.20 committed-use credit: 1.00
    _gcp(
        "Compute Engine",
        "13:00:00",
        "01 14:00:00",
        "vllm",
        "1.20",
        json.dumps([{"name": "CUD", "amount": -0.2}]),
    ),
    _gcp("Compute Engine", "13:00:00", "01 14:00:00", "vllm", "0.20", "[]"),
    _gcp("Compute Engine", "14:00:00", "01 15:00:00", "vllm", "2.00"),
    _gcp("Compute Engine", "13:00:00", "01 14:00:00", "other", "5.00"),
    _gcp("Networking", "00:00:00", "02 00:00:00", "vllm", "2.40"),
]

# big: 3M tokens at 13:00 (of 4M), 7M at 14:00; small: 1M at 13:00; 02T01:00 is counted but not billed yet
TOKENS = """hour,workload,model,prompt_tokens,generation_tokens,requests
2025-03-01T13:00:00Z,llm/vllm,big,1000000,2000000,100
2025-03-01T13:00:00Z,llm/vllm,small,500000,500000,50
2025-03-01T14:00:00Z,llm/vllm,big,2000000,5000000,300
2025-03-02T01:00:00Z,llm/vllm,big,60,40,1
2025-03-01T14:00:00Z,llm/other,big,9,9,9
"""


def _csv(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _hour(h: int) -> datetime:
    return datetime(2025, 3, 1, h, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        (_csv(AWS_HEADER, AWS_ROWS), {"user:app": "vllm"}),
        (_csv(GCP_HEADER, GCP_ROWS), {"k8s-label/app": "vllm"}),
    ],
)
def test_both_layouts_give_the_same_hourly_cost(text: str, tag: dict[str, str]) -> None:
    rows = costs.read_billing(io.StringIO(text), tags=tag)
    hourly = costs.hourly_cost(rows)
    assert hourly[_hour(13)] == pytest.approx(1.30)
    assert hourly[_hour(14)] == pytest.approx(2.10)
    assert len(hourly) == 24 and sum(hourly.values()) == pytest.approx(1.20 + 2.00 + 2.40)


def test_reconcile_by_hand() -> None:
    rows = costs.read_billing(io.StringIO(_csv(AWS_HEADER, AWS_ROWS)), tags={"user:app": "vllm"})
    counts = [c for c in costs.read_tokens(io.StringIO(TOKENS)) if c.workload == "llm/vllm"]
    result = costs.reconcile(costs.hourly_cost(rows), counts)
    big, small, total = result.models["big"], result.models["small"], result.total
    # big: 3/4 of 1.30 + all of 2.10 = 3.075 for 10M tokens; small: 1/4 of 1.30 = 0.325 for 1M
    assert big.cost == pytest.approx(3.075) and big.tokens == 10_000_000
    assert big.cost_per_1k_tokens == pytest.approx(0.0003075)
    assert small.cost == pytest.approx(0.325) and small.cost_per_1k_tokens == pytest.approx(0.000325)
    assert total.cost == pytest.approx(3.40) and total.cost_per_1k_tokens == pytest.approx(3.40 / 11_000)
    assert result.hours == 2 and result.idle_hours == 0
    assert result.counted_not_billed == [datetime(2025, 3, 2, 1, tzinfo=UTC)]
    assert len(result.billed_not_counted) == 22 and result.billed_not_counted_cost == pytest.approx(2.20)


def test_idle_hours_are_shared_out_by_tokens() -> None:
    hourly = {_hour(12): 1.10, _hour(13): 1.30}
    counts = [
        costs.HourlyTokens(_hour(12), "llm/vllm", "big"),  # replicas up, no tokens
        costs.HourlyTokens(_hour(13), "llm/vllm", "big", 1_000_000, 2_000_000),
        costs.HourlyTokens(_hour(13), "llm/vllm", "small", 500_000, 500_000),
    ]
    result = costs.reconcile(hourly, counts)
    assert result.idle_hours == 1 and result.idle_cost == pytest.approx(1.10)
    # big: 0.975 + 3/4 of the idle 1.10 = 1.8; small: 0.325 + 0.275 = 0.6
    assert result.models["big"].cost == pytest.approx(1.8)
    assert result.models["small"].cost == pytest.approx(0.6)
    assert result.total.cost_per_1k_tokens == pytest.approx(2.40 / 4000)


def _bad(header: list[str], rows: list[list[str]], **kw: object) -> RowError:
    with pytest.raises(RowError) as info:
        costs.read_billing(io.StringIO(_csv(header, rows)), "cur.csv", **kw)
    return info.value


@pytest.mark.parametrize(
    ("index", "column", "value", "reason"),
    [
        (5, "lineItem/UnblendedCost", "1,00", "expected a number, got '1,00'"),
        (5, "lineItem/UnblendedCost", "nan", "expected a finite number"),
        (3, "lineItem/UsageStartDate", "yesterday", "expected a date and time"),
        (3, "lineItem/UsageEndDate", "2025-03-01T12:00:00Z", "ends before it starts"),
    ],
)
def test_malformed_aws_rows_name_row_and_column(index: int, column: str, value: str, reason: str) -> None:
    rows = [list(r) for r in AWS_ROWS]
    rows[index - 2][AWS_HEADER.index(column)] = value
    error = _bad(AWS_HEADER, rows)
    assert (error.row, error.column) == (index, column)
    assert reason in str(error) and f"cur.csv: row {index}, column '{column}'" in str(error)


def test_malformed_gcp_rows_name_row_and_column() -> None:
    rows = [list(r) for r in GCP_ROWS]
    rows[1][GCP_HEADER.index("labels")] = "{not json"
    error = _bad(GCP_HEADER, rows, tags={"k8s-label/app": "vllm"})
    assert (error.row, error.column) == (3, "labels") and "expected JSON" in str(error)
    rows = [list(r) for r in GCP_ROWS]
    rows[0][GCP_HEADER.index("credits")] = json.dumps([{"name": "CUD"}])
    error = _bad(GCP_HEADER, rows)
    assert (error.row, error.column) == (2, "credits") and "numeric amount" in str(error)
    rows = [list(r) for r in GCP_ROWS]
    rows[2] = rows[2][:3]  # a truncated line
    error = _bad(GCP_HEADER, rows)
    assert (error.row, error.column) == (4, "cost")
    rows = [list(r) for r in GCP_ROWS]
    rows[3].append("extra")
    assert _bad(GCP_HEADER, rows).row == 5


def test_bad_headers() -> None:
    assert _bad(["date", "amount"], []).row == 1
    error = _bad(AWS_HEADER, AWS_ROWS, tags={"user:team": "x"})
    assert error.column == "resourceTags/user:team" and error.row == 1
    error = _bad(AWS_HEADER, AWS_ROWS, cost_column="lineItem/NetUnblendedCost")
    assert error.column == "lineItem/NetUnblendedCost"
    error = _bad([c for c in GCP_HEADER if c != "labels"], [], tags={"app": "x"}, layout="gcp")
    assert error.column == "labels"


@pytest.mark.parametrize(
    ("line", "column", "reason"),
    [
        ("2025-03-01T13:00:00Z,llm/vllm,big,-5,0,1", "prompt_tokens", "a count of 0 or more"),
        ("2025-03-01T13:00:00Z,llm/vllm,big,5,x,1", "generation_tokens", "a whole number"),
        ("2025-03-01T13:30:00Z,llm/vllm,big,5,5,1", "hour", "the start of an hour"),
    ],
)
def test_malformed_token_rows(line: str, column: str, reason: str) -> None:
    text = TOKENS.splitlines()[0] + "\n" + TOKENS.splitlines()[1] + "\n" + line + "\n"
    with pytest.raises(RowError) as info:
        costs.read_tokens(io.StringIO(text), "tokens.csv")
    assert (info.value.row, info.value.column) == (3, column) and reason in str(info.value)


def test_tokens_csv_round_trip() -> None:
    counts = costs.read_tokens(io.StringIO(TOKENS))
    out = io.StringIO()
    costs.write_tokens(out, counts)
    assert sorted(out.getvalue().splitlines()) == sorted(TOKENS.splitlines())


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    cur = tmp_path / "cur.csv"
    cur.write_text(_csv(AWS_HEADER, AWS_ROWS))
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(TOKENS)
    return cur, tokens


def test_command_outputs(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cur, tokens = files
    args = ["cost", "reconcile", "--billing", str(cur), "--tag", "user:app=vllm", "--tokens", str(tokens)]
    assert cli([*args, "--only-workload", "llm/vllm", "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    by_model = {m["model"]: m for m in body["models"]}
    assert by_model["big"]["costPer1kTokens"] == pytest.approx(0.0003075)
    assert by_model["(all)"]["cost"] == pytest.approx(3.40)
    assert body["hoursCountedNotBilled"] == ["2025-03-02T01:00:00Z"]
    assert cli([*args, "--only-workload", "llm/vllm", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["model"] for r in rows] == ["big", "small", "(all)"]
    assert float(rows[1]["cost_per_1k_tokens"]) == pytest.approx(0.000325)
    assert cli([*args, "--only-workload", "llm/vllm"]) == 0
    table = capsys.readouterr().out
    assert "0.000308" in table and "22 billed hours without token counts" in table


def test_command_errors_name_the_row(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cur, tokens = files
    cur.write_text(cur.read_text().replace("0.20", "zero"))
    assert cli(["cost", "reconcile", "--billing", str(cur), "--tokens", str(tokens)]) == 1
    assert "row 3, column 'lineItem/UnblendedCost': expected a number" in capsys.readouterr().err


def test_help_says_never_for_autoscaling(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["cost", "reconcile", "--help"])
    assert "never to autoscale" in " ".join(capsys.readouterr().out.split())


def test_token_counts_from_the_stream(
    redis_url: str, workload: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis.Redis.from_url(redis_url)
    sidecar = FakeSidecar(client, workload, "pod-a")
    t13 = int(_hour(13).timestamp() * 1000)
    sidecar.flush(t13 + 600_000, model="big", sp=100, sg=200, rq=1)
    sidecar.flush(t13 + 3_000_000, model="big", sp=10, sg=20, rq=1)
    sidecar.flush(t13 + 3_900_000, model="big", sp=1, sg=2, rq=1)  # 14:05
    out = tmp_path / "tokens.csv"
    base = ["cost", "tokens", "--workload", workload, "--redis-url", redis_url, "--out", str(out)]
    assert cli(base) == 0
    sidecar.flush(t13 + 4_000_000, model="big", sp=1000, sg=0, rq=1)  # 14:06, after the first run
    assert cli(base) == 0  # resumes after the last entry: nothing counted twice
    counts = {(c.hour.hour, c.model): c for c in costs.read_tokens(out.open())}
    assert (counts[(13, "big")].prompt, counts[(13, "big")].generation, counts[(13, "big")].requests) == (
        110,
        220,
        2,
    )
    assert (counts[(14, "big")].prompt, counts[(14, "big")].generation) == (1001, 2)

    cur = tmp_path / "cur.csv"
    cur.write_text(_csv(AWS_HEADER, AWS_ROWS))
    args = ["cost", "reconcile", "--billing", str(cur), "--tag", "user:app=vllm", "--format", "json"]
    assert cli([*args, "--workload", workload, "--redis-url", redis_url]) == 0
    body = json.loads(capsys.readouterr().out)
    (big,) = [m for m in body["models"] if m["model"] == "big"]
    # 1.30 for 330 tokens at 13:00, 2.10 for 1003 at 14:00
    assert big["cost"] == pytest.approx(3.40) and big["costPer1kTokens"] == pytest.approx(3.40 / 1333 * 1000)
