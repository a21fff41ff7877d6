"""``token-scaler cost``: reconcile a cloud billing export with the token counts of the same hours.

    token-scaler cost tokens --workload llm/vllm --out tokens.csv [--follow]
    token-scaler cost reconcile --billing cur.csv --tag user:app=vllm --tokens tokens.csv [--format json]

Billing data arrives hours to a day late: this is for reporting (daily), never for
autoscaling, which runs on the live token rates.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from billing import costs
from token_scaler.config import redis_url_argument as check_redis_url
from token_scaler.config import workload_name
from token_scaler.errors import ConfigError, RecordError, RowError
from token_scaler.record import DEFAULT_RETENTION_S, decode, entry_time_ms, stream_key

NOT_FOR_SCALING = (
    "Billing exports arrive hours to a day late: use this to reconcile and report (say daily), "
    "never to autoscale; the scaler runs on live token rates."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-scaler cost",
        description="Empirical cost per 1k tokens from a cloud billing export and token counts. "
        + NOT_FOR_SCALING,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser(
        "reconcile",
        help="billing export + hourly token counts -> cost per 1k tokens per model",
        description="Match a billing export (AWS CUR, GCP billing export or Azure cost details "
        "export, CSV) with hourly token "
        "counts and print the empirical cost per 1k tokens per model. " + NOT_FOR_SCALING,
    )
    rec.add_argument("--billing", required=True, type=Path, help="the billing export (CSV)")
    rec.add_argument(
        "--layout", choices=("auto", "aws", "gcp", "azure"), default="auto", help="default: from the header"
    )
    rec.add_argument(
        "--cost-column",
        help="cost column (default lineItem/UnblendedCost for AWS, cost (+ credits) for GCP, "
        "CostInBillingCurrency for Azure), e.g. lineItem/NetUnblendedCost",
    )
    rec.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep rows with this tag (AWS: the column resourceTags/KEY, e.g. user:app=vllm), "
        "label (GCP: a key of labels) or tag (Azure: a key of Tags); repeatable, all must match",
    )
    rec.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="ID",
        help="keep rows of this resource (lineItem/ResourceId, resource.name, ResourceId); repeatable",
    )
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", type=Path, help="hourly token counts (CSV, as `cost tokens` writes)")
    source.add_argument(
        "--workload",
        type=workload_name,
        help="read the counts from this workload's Redis stream instead (it holds only the last "
        f"~{DEFAULT_RETENTION_S // 60} minutes: keep a CSV with `cost tokens --follow` for whole days)",
    )
    rec.add_argument("--only-workload", type=workload_name, help="with --tokens: count only this workload")
    rec.add_argument(
        "--redis-url",
        type=check_redis_url,
        default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        help="with --workload: the Redis holding its stream (env REDIS_URL; default redis://localhost:6379/0)",
    )
    rec.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="how to print the cost per 1k tokens per model (default table)",
    )

    tok = sub.add_parser(
        "tokens",
        help="hourly token counts of a workload from its Redis stream, to a CSV",
        description="Sum a workload's stream into hourly token counts per model and merge them into "
        "a CSV (resuming after the last entry counted, kept in <out>.last-id). The stream holds "
        f"only ~{DEFAULT_RETENTION_S // 60} minutes: run it with --follow, or at least every 15 minutes.",
    )
    tok.add_argument(
        "--workload",
        required=True,
        type=workload_name,
        help="<namespace>/<name>: the workload whose stream to count (the sidecars' TOKEN_SCALER_WORKLOAD)",
    )
    tok.add_argument("--out", required=True, type=Path, help="the CSV to merge into ('-': stdout, no state)")
    tok.add_argument(
        "--redis-url",
        type=check_redis_url,
        default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        help="the Redis holding the workload's stream (env REDIS_URL; default redis://localhost:6379/0)",
    )
    tok.add_argument(
        "--follow", action="store_true", help="keep reading; write the CSV every --write-every s"
    )
    tok.add_argument("--write-every", type=float, default=60.0, help="seconds between writes with --follow")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tokens":
            return _tokens(args)
        return _reconcile(args)
    except RowError as exc:
        print(f"token-scaler cost: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"token-scaler cost: {exc}", file=sys.stderr)
        return 1


# --- reconcile ---------------------------------------------------------------------


def _tags(raw: list[str]) -> dict[str, str]:
    tags = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def _reconcile(args: argparse.Namespace) -> int:
    with args.billing.open(newline="", encoding="utf-8-sig") as f:
        rows = costs.read_billing(
            f,
            str(args.billing),
            layout=args.layout,
            cost_column=args.cost_column,
            tags=_tags(args.tag),
            resources=args.resource,
        )
    if args.tokens is not None:
        with args.tokens.open(newline="", encoding="utf-8") as f:
            counts = costs.read_tokens(f, str(args.tokens))
        if args.only_workload:
            counts = [c for c in counts if c.workload == args.only_workload]
    else:
        counts, _ = stream_counts(args.redis_url, args.workload, "-")
    result = costs.reconcile(costs.hourly_cost(rows), counts)
    sys.stdout.write(render(result, args.format, matched_rows=len(rows)))
    return 0


def render(result: costs.Reconciliation, fmt: str, *, matched_rows: int = 0) -> str:
    """The reconciliation as JSON, CSV or a text table (any other ``fmt``), one row a model
    and the total last."""
    models = [*sorted(result.models.values(), key=lambda m: m.model), result.total]
    if fmt == "json":
        return _render_json(result, models, matched_rows)
    if fmt == "csv":
        return _render_csv(models)
    return _render_table(result, models, matched_rows)


def _render_json(result: costs.Reconciliation, models: list[costs.ModelResult], matched_rows: int) -> str:
    body: dict[str, Any] = {
        "models": [
            {
                "model": m.model,
                "promptTokens": m.prompt_tokens,
                "generationTokens": m.generation_tokens,
                "cost": m.cost,
                "costPer1kTokens": m.cost_per_1k_tokens,
            }
            for m in models
        ],
        "billingRowsMatched": matched_rows,
        "hoursReconciled": result.hours,
        "idleHours": result.idle_hours,
        "idleCost": result.idle_cost,
        "hoursBilledNotCounted": [costs.format_hour(h) for h in result.billed_not_counted],
        "costBilledNotCounted": result.billed_not_counted_cost,
        "hoursCountedNotBilled": [costs.format_hour(h) for h in result.counted_not_billed],
    }
    return json.dumps(body, indent=2) + "\n"


def _render_csv(models: list[costs.ModelResult]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "prompt_tokens", "generation_tokens", "cost", "cost_per_1k_tokens"])
    for m in models:
        c = m.cost_per_1k_tokens
        writer.writerow(
            [
                m.model,
                m.prompt_tokens,
                m.generation_tokens,
                f"{m.cost:.6f}",
                "" if c is None else f"{c:.8f}",
            ]
        )
    return out.getvalue()


def _render_table(result: costs.Reconciliation, models: list[costs.ModelResult], matched_rows: int) -> str:
    lines = [f"{'model':<32} {'prompt tokens':>15} {'generated':>15} {'cost':>12} {'per 1k tokens':>14}"]
    for m in models:
        c = m.cost_per_1k_tokens
        shown = "-" if c is None else f"{c:.6f}"
        lines.append(
            f"{m.model:<32} {m.prompt_tokens:>15,} {m.generation_tokens:>15,} {m.cost:>12.4f} {shown:>14}"
        )
    lines.append("")
    lines.append(f"{matched_rows} billing rows matched; {result.hours} hours reconciled")
    lines.extend(_footnotes(result))
    return "\n".join(lines) + "\n"


def _footnotes(result: costs.Reconciliation) -> list[str]:
    """The table's closing lines: idle hours, and hours billed or counted on one side only."""
    lines = []
    if result.idle_hours:
        lines.append(
            f"{result.idle_hours} idle hours (no tokens) cost {result.idle_cost:.4f}, shared out by tokens"
        )
    if result.billed_not_counted:
        first = costs.format_hour(result.billed_not_counted[0])
        lines.append(
            f"left out: {len(result.billed_not_counted)} billed hours without token counts "
            f"(cost {result.billed_not_counted_cost:.4f}), from {first}"
        )
    if result.counted_not_billed:
        lines.append(
            f"left out: {len(result.counted_not_billed)} counted hours not billed yet, "
            f"from {costs.format_hour(result.counted_not_billed[0])}"
        )
    return lines


# --- tokens ------------------------------------------------------------------------


def stream_counts(url: str, workload: str, after: str) -> tuple[list[costs.HourlyTokens], str]:
    """Hourly counts of the stream's entries after ID ``after`` ("-": all); and the last ID read."""
    from token_scaler.redis_conn import sync_client

    client = sync_client(url)
    counts: dict[tuple[datetime, str], costs.HourlyTokens] = {}
    last = after
    key = stream_key(workload)
    try:
        first = _xrange(client, key, "-", 1)
        if after != "-" and first and _id(first[0][0].decode()) > _id(after):
            print(
                f"token-scaler cost: warning: the stream of {workload} starts at {first[0][0].decode()}, "
                f"after the last entry counted ({after}): entries in between may have been trimmed",
                file=sys.stderr,
            )
        start = "-" if after == "-" else "(" + after
        while True:
            page = _xrange(client, key, start, 2000)
            for entry_id, fields in page:
                last = entry_id.decode()
                try:
                    record = decode(fields)
                except RecordError:
                    continue  # the scaler counts and logs bad entries; a report skips them
                t = datetime.fromtimestamp(entry_time_ms(record, entry_id) / 1000, UTC)
                hour = costs.hour_of(t)
                for model, mc in record.models.items():
                    c = counts.setdefault((hour, model), costs.HourlyTokens(hour, workload, model))
                    c.prompt += mc.served_prompt
                    c.generation += mc.served_generation
                    c.requests += mc.requests
            if len(page) < 2000:
                break
            start = "(" + last
    finally:
        client.close()
    return list(counts.values()), last


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _xrange(client: Any, key: str, start: str, count: int) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
    page: list[tuple[bytes, Mapping[bytes, bytes]]] = client.xrange(key, min=start, max="+", count=count)
    return page


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _tokens(args: argparse.Namespace) -> int:
    if args.follow:
        signal.signal(signal.SIGTERM, _interrupt)  # a Pod's stop: write what is counted, then exit
    out: Path = args.out
    state = out.with_name(out.name + ".last-id")
    existing: list[costs.HourlyTokens] = []
    last = "-"
    if str(out) != "-" and out.exists():
        with out.open(newline="", encoding="utf-8") as f:
            existing = costs.read_tokens(f, str(out))
        if state.exists():
            last = state.read_text().strip() or "-"
    while True:
        fresh, last = stream_counts(args.redis_url, args.workload, last)
        existing = costs.merge_tokens(existing, fresh)
        if str(out) == "-":
            costs.write_tokens(sys.stdout, existing)
            return 0
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            costs.write_tokens(f, existing)
        os.replace(tmp, out)
        state.write_text(last + "\n")
        if not args.follow:
            return 0
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.write_every)
            continue
        return 0
