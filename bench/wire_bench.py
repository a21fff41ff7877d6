"""What counting a stream costs per event: Anthropic's Messages API against OpenAI's chat, same run.

    python -m bench.wire_bench                # ~20 s, CPU only, no network or Redis

The sidecar's per-event work on a stream (sidecar/sse.py's parser, then accounting.py's count
through the wire format's parser: sidecar/openai.py or sidecar/anthropic.py) for one stream of
``--tokens`` generated tokens, one token per event, in each format: OpenAI's chat with the usage
chunk the sidecar asks for, Anthropic's full event sequence (message_start, a content block,
ping, message_delta, message_stop). Rounds alternate the two formats, so drift on a shared
machine hits both alike. Reported: microseconds per event (p50, p90, p99 over the rounds) and
the ratio Anthropic / OpenAI of the medians. Results: bench/results/wire.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from bench._common import percentiles, save
from sidecar import wires
from sidecar.accounting import Accounting
from sidecar.labels import ModelLabels
from sidecar.meter import LabelBound, Meter
from sidecar.metrics import Metrics
from sidecar.openai import Kind
from sidecar.sse import SSEParser
from sidecar.tokens import LengthEstimate


def _data(doc: object, name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


def openai_stream(tokens: int) -> tuple[bytes, bytes]:
    request = {
        "model": "m",
        "max_tokens": tokens,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [_data({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    for j in range(tokens):
        events.append(_data({**base, "choices": [{"index": 0, "delta": {"content": f"t{j} "}}]}))
    events.append(_data({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    usage = {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}
    events += [_data({**base, "choices": [], "usage": usage}), b"data: [DONE]\n\n"]
    return json.dumps(request).encode(), b"".join(events)


def anthropic_stream(tokens: int) -> tuple[bytes, bytes]:
    request = {
        "model": "m",
        "max_tokens": tokens,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    usage = {
        "input_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    start = {"id": "msg", "type": "message", "role": "assistant", "content": [], "model": "m", "usage": usage}
    events = [
        _data({"type": "message_start", "message": start}, "message_start"),
        _data(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
        _data({"type": "ping"}, "ping"),
    ]
    for j in range(tokens):
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"t{j} "}}
        events.append(_data(delta, "content_block_delta"))
    events.append(_data({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    final = {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens"},
        "usage": {"output_tokens": tokens},
    }
    events += [_data(final, "message_delta"), _data({"type": "message_stop"}, "message_stop")]
    return json.dumps(request).encode(), b"".join(events)


def counter(kind: Kind, request: bytes, stream: bytes) -> Callable[[], tuple[int, float]]:
    """One stream counted as the sidecar counts it: (events, seconds)."""
    accounting = Accounting(
        Meter(), Metrics(CollectorRegistry(), 30.0), LengthEstimate(), LabelBound(100), ModelLabels(32, None)
    )
    parsed = wires.parse_request(kind, request)
    assert parsed is not None
    reads = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]

    def run() -> tuple[int, float]:
        metered, exchange = accounting.arrive(parsed, request, 9, parsed.max_tokens, "m", "t", False, None)
        exchange.streamed = True
        parser = SSEParser()
        events = 0
        started = time.perf_counter()
        for data in reads:
            for event in parser.feed(data):
                accounting.event(event, metered, exchange)
                events += 1
        elapsed = time.perf_counter() - started
        prompt, generation = accounting.settle(metered, exchange)
        assert (prompt, generation) == (9, parsed.max_tokens), (kind, prompt, generation)
        return events, elapsed

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="generated tokens per stream")
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    runs = {
        "openai": counter(Kind.CHAT, *openai_stream(args.tokens)),
        "anthropic": counter(Kind.MESSAGES, *anthropic_stream(args.tokens)),
    }
    for run in runs.values():  # warm up
        run()
    per_event: dict[str, list[float]] = {name: [] for name in runs}
    events: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            count, seconds = run()
            events[name] = count
            per_event[name].append(seconds / count * 1e6)
    result: dict[str, object] = {"tokens": args.tokens, "rounds": args.rounds, "events": events}
    for name, samples in per_event.items():
        stats = percentiles(samples, (50, 90, 99))
        result[name] = stats
        print(
            f"{name:9} {events[name]} events/stream: us/event p50 {stats['p50']:.2f}  "
            f"p90 {stats['p90']:.2f}  p99 {stats['p99']:.2f}"
        )
    openai_p50 = percentiles(per_event["openai"], (50,))["p50"]
    ratio = percentiles(per_event["anthropic"], (50,))["p50"] / openai_p50
    result["ratio_p50"] = ratio
    print(f"anthropic / openai per event (p50): {ratio:.2f}")
    print(f"results: {save('wire', result)}")


if __name__ == "__main__":
    main()
