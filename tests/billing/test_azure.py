"""Azure Cost Management exports (EA actual cost, MCA amortized cost) reconciled by hand-computed cases.

The two CSVs beside this file, one row a line:
- azure_ea_actual.csv (EA column names, tags without braces): on 03/01/2025 the app=vllm GPU
  node pool 48.00 and its disk 2.40; a reserved GPU node costs 0.00 in the actual cost; the
  reservation's purchase (8,760.00) and another app's VM (12.00) do not count: 50.40 a day;
- azure_mca_amortized.csv (MCA column names): the same day amortized: the reserved node at
  24.00, so 74.40; the unused reservation and the purchase carry no tag; 03/02 has a refund
  of the disk (-2.40).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from billing import costs
from billing.rows import BillingRow
from token_scaler.cli import main as cli
from token_scaler.errors import RowError

HERE = Path(__file__).parent
EA_ACTUAL = HERE / "azure_ea_actual.csv"
MCA_AMORTIZED = HERE / "azure_mca_amortized.csv"
VMSS = (
    "/subscriptions/0000/resourceGroups/MC_llm/providers/Microsoft.Compute/"
    "virtualMachineScaleSets/aks-gpu-12345-vmss"
)
TOKENS = """hour,workload,model,prompt_tokens,generation_tokens,requests
2025-03-01T13:00:00Z,llm/vllm,big,1000000,2000000,100
2025-03-01T13:00:00Z,llm/vllm,small,500000,500000,50
2025-03-01T14:00:00Z,llm/vllm,big,2000000,5000000,300
"""


def read(path: Path, **kw: object) -> list[BillingRow]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return costs.read_billing(f, path.name, **kw)


def test_the_layout_is_told_by_the_header_in_either_agreement() -> None:
    for path in (EA_ACTUAL, MCA_AMORTIZED):
        header = path.read_text().splitlines()[0].split(",")
        assert costs.detect_layout(header) == "azure"


@pytest.mark.parametrize(
    ("path", "per_day"),
    [(EA_ACTUAL, 50.40), (MCA_AMORTIZED, 74.40)],
)
def test_daily_rows_spread_over_the_days_hours(path: Path, per_day: float) -> None:
    hourly = costs.hourly_cost(read(path, tags={"app": "vllm"}))
    day = [datetime(2025, 3, 1, h, tzinfo=UTC) for h in range(24)]
    assert [hourly[h] for h in day] == pytest.approx([per_day / 24] * 24)
    refund = -2.40 if path == MCA_AMORTIZED else 0.0
    assert sum(hourly.values()) == pytest.approx(per_day + refund)


def test_purchases_are_left_out_and_resources_match_without_case() -> None:
    everything = read(EA_ACTUAL)
    assert sum(r.cost for r in everything) == pytest.approx(48 + 2.40 + 0 + 12)  # not the 8,760 purchase
    assert [r.row for r in everything] == [2, 3, 4, 6]
    tagged = read(EA_ACTUAL, tags={"app": "vllm", "env": "prod"})
    assert {r.tags["app"] for r in tagged} == {"vllm"} and len(tagged) == 3
    one = read(MCA_AMORTIZED, resources=[VMSS.upper()])
    assert [(r.row, r.cost) for r in one] == [(2, 48.0)]


def test_reconcile_the_amortized_export_by_hand() -> None:
    rows = read(MCA_AMORTIZED, tags={"app": "vllm"})
    result = costs.reconcile(costs.hourly_cost(rows), costs.read_tokens(io.StringIO(TOKENS)))
    hour = 74.40 / 24  # 3.10
    # big: 3/4 of 13:00 and all of 14:00; small: 1/4 of 13:00
    assert result.models["big"].cost == pytest.approx(hour * 0.75 + hour)
    assert result.models["small"].cost == pytest.approx(hour * 0.25)
    assert result.hours == 2 and len(result.billed_not_counted) == 22 + 24
    assert result.billed_not_counted_cost == pytest.approx(22 * hour - 2.40)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    header, *rows = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    return header, rows


def _bad(path: Path, row: int, column: str, value: str, **kw: object) -> RowError:
    header, rows = _rows(path)
    rows[row - 2][header.index(column)] = value
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    with pytest.raises(RowError) as info:
        costs.read_billing(io.StringIO(out.getvalue()), path.name, **kw)
    return info.value


@pytest.mark.parametrize(
    ("path", "row", "column", "value", "reason"),
    [
        (EA_ACTUAL, 3, "CostInBillingCurrency", "2,40", "expected a number, got '2,40'"),
        (MCA_AMORTIZED, 4, "costInBillingCurrency", "", "expected a number, got ''"),
        (
            EA_ACTUAL,
            2,
            "Date",
            "yesterday",
            "expected a date such as 03/01/2025 or 2025-03-01, got 'yesterday'",
        ),
        (MCA_AMORTIZED, 8, "date", "02/30/2025", "got '02/30/2025'"),
        (EA_ACTUAL, 4, "Tags", '"app": vllm', "expected tags as a JSON object"),
        (MCA_AMORTIZED, 3, "billingCurrency", "EUR", "'EUR' is not the currency of row 2 ('USD')"),
    ],
)
def test_a_bad_row_is_named_by_number_and_column(
    path: Path, row: int, column: str, value: str, reason: str
) -> None:
    error = _bad(path, row, column, value)
    assert (error.row, error.column) == (row, column)
    assert f"{path.name}: row {row}, column '{column}': " in str(error) and reason in str(error)


def test_iso_dates_and_a_chosen_cost_column() -> None:
    header, rows = _rows(EA_ACTUAL)
    rows = [r for r in rows if r[header.index("ChargeType")] != "Purchase"]
    for r in rows:
        r[header.index("Date")] = "2025-03-01"
    header[header.index("EffectivePrice")] = "CostInUsd"
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    read_rows = costs.read_billing(io.StringIO(out.getvalue()), cost_column="costinusd", layout="azure")
    assert [r.start for r in read_rows] == [datetime(2025, 3, 1, tzinfo=UTC)] * 4
    assert [r.cost for r in read_rows] == [2.0, 2.4, 0.0, 0.5]
    with pytest.raises(RowError) as info:
        costs.read_billing(io.StringIO(out.getvalue()), "x.csv", cost_column="PaygCostInBillingCurrency")
    assert (info.value.row, info.value.column) == (1, "PaygCostInBillingCurrency")


def test_the_command_reads_azure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(TOKENS)
    args = ["cost", "reconcile", "--billing", str(EA_ACTUAL), "--tag", "app=vllm", "--tokens", str(tokens)]
    assert cli([*args, "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    by_model = {m["model"]: m for m in body["models"]}
    assert by_model["(all)"]["cost"] == pytest.approx(2 * 50.40 / 24)
    assert body["billingRowsMatched"] == 3
