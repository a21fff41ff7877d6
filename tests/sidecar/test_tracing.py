"""OpenTelemetry traces of the sidecar, exported to a real OTLP receiver over gRPC and HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from sidecar.server import Sidecar
from tests.otlp_receiver import OtlpReceiver, Received
from tests.sidecar.conftest import StartSidecar, scope
from tests.sidecar.fake_anthropic import FakeAnthropic
from tests.sidecar.fake_upstream import FakeUpstream
from tests.sidecar.policy.test_policy_proxy import write_policy
from token_scaler import tracing
from token_scaler.errors import ConfigError

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MESSAGES = [{"role": "user", "content": "Count some tokens for the trace."}]
SERVICE = "token-scaler-sidecar"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A receiver, and an environment with no OTEL_* variable but those a test sets."""
    import os

    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    otlp = OtlpReceiver().start()
    try:
        yield otlp
    finally:
        otlp.stop()


def traced(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver, protocol: str, **extra: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint(protocol))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


def client(sidecar: Sidecar, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.port}/v1",
        api_key="unused",
        max_retries=0,
        default_headers=headers or None,
    )


async def exported(sidecar: Sidecar) -> None:
    assert sidecar.tracing is not None
    assert await asyncio.to_thread(sidecar.tracing.flush)


def pair(receiver: OtlpReceiver) -> tuple[Received, Received]:
    [server] = receiver.named(SERVICE, "server")
    [call] = receiver.named(SERVICE, "client")
    return server, call


def forwarded_traceparent(upstream: FakeUpstream) -> str | None:
    return {k.lower(): v for k, v in upstream.requests[-1][2].items()}.get("traceparent")


def forwarded(upstream: FakeUpstream) -> tuple[str, str, bool]:
    """The trace id, parent id and sampled flag the model server received."""
    sent = forwarded_traceparent(upstream)
    assert sent is not None
    version, trace_id, parent_id, flags = sent.split("-")
    assert version == "00"
    return trace_id, parent_id, bool(int(flags, 16) & 1)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_a_request_is_a_server_span_and_a_client_span_with_the_metered_tokens(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
) -> None:
    traced(monkeypatch, receiver, protocol)
    sidecar = await start_sidecar()
    async with client(sidecar, traceparent=TRACEPARENT, **{"X-Tenant-ID": "acme"}) as sdk:
        answer = await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=7)
    assert answer.usage is not None
    await exported(sidecar)

    server, call = pair(receiver)
    assert server.protocol == ("grpc" if protocol == "grpc" else "http")
    # Continued from the client's traceparent; the model server gets the client span's context.
    assert server.trace_id == call.trace_id == TRACE_ID
    assert server.parent_id == PARENT_ID and call.parent_id == server.span_id
    assert forwarded(upstream) == (TRACE_ID, call.span_id, True)
    assert server.name == "POST /v1/chat/completions" and call.name == "chat fake"
    attributes = call.attributes
    assert attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens == upstream.reported.prompt
    assert attributes["gen_ai.usage.output_tokens"] == 7 == upstream.reported.generation
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "fake"
    assert attributes["gen_ai.request.max_tokens"] == 7
    assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == upstream.port
    assert attributes["http.response.status_code"] == 200 and attributes["tokenscaler.tenant"] == "acme"
    assert server.attributes["tokenscaler.usage.input_tokens"] == upstream.reported.prompt
    assert server.attributes["tokenscaler.usage.output_tokens"] == 7
    assert server.attributes["tokenscaler.usage.source"] == "reported"
    assert server.attributes["tokenscaler.tenant"] == "acme"
    assert server.attributes["http.response.status_code"] == 200
    assert not server.error and not call.error
    assert call.span.start_time_unix_nano >= server.span.start_time_unix_nano
    assert call.span.end_time_unix_nano <= server.span.end_time_unix_nano


async def test_a_stream_ends_its_spans_when_it_ends_with_its_counted_tokens(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traced(monkeypatch, receiver, "http/protobuf")
    sidecar = await start_sidecar()
    async with client(sidecar) as sdk:
        stream = await sdk.chat.completions.create(
            model="fake",
            messages=MESSAGES,
            max_tokens=9,
            stream=True,
            extra_headers={"X-Fake-Per-Chunk": "2"},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks  # the client did not ask for usage: the sidecar asked, and removed it again
    assert all(chunk.usage is None for chunk in chunks)
    await exported(sidecar)

    server, call = pair(receiver)
    # No traceparent from the client: a new trace, the server span its root.
    assert server.parent_id == "" and server.trace_id == call.trace_id
    assert call.attributes["gen_ai.usage.input_tokens"] == upstream.reported.prompt
    assert call.attributes["gen_ai.usage.output_tokens"] == 9 == upstream.reported.generation
    assert call.attributes["gen_ai.response.model"] == "fake"
    assert server.attributes["tokenscaler.stream"] is True
    ttft = call.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttft * 1e9 <= call.span.end_time_unix_nano - call.span.start_time_unix_nano
    assert call.events == ["gen_ai.first_chunk"]
    assert forwarded(upstream) == (call.trace_id, call.span_id, True)


async def test_a_client_leaving_mid_stream_ends_the_spans_with_what_was_counted(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traced(monkeypatch, receiver, "grpc")
    sidecar = await start_sidecar()
    body = {"model": "fake", "messages": MESSAGES, "max_tokens": 500, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"http://127.0.0.1:{sidecar.port}/v1/chat/completions",
            json=body,
            headers={"X-Fake-Delay": "0.01"},
        )
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"data: {")
            if seen == 5:
                break
        response.close()
    for _ in range(500):
        if upstream.disconnects:
            break
        await asyncio.sleep(0.01)
    for _ in range(500):  # the handler settles after the upstream connection closed
        await exported(sidecar)
        if receiver.named(SERVICE, "server"):
            break
        await asyncio.sleep(0.01)

    server, call = pair(receiver)
    generated = sidecar.registry.get_sample_value(
        "tokenscaler_tokens_total", {"type": "generation", "model": "fake", "tenant": "none"}
    )
    assert generated is not None and 1 <= generated < 500
    assert call.attributes["gen_ai.usage.output_tokens"] == generated
    assert server.attributes["tokenscaler.usage.output_tokens"] == generated
    assert server.attributes["tokenscaler.client_gone"] is True
    assert server.attributes["http.response.status_code"] == 499
    assert server.attributes["tokenscaler.usage.source"] == "counted"


async def test_a_client_leaving_during_admission_ends_the_server_span(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    policy_file: Path,
    workload: str,
) -> None:
    """The policies wait on a Redis that takes the connection and never answers; the client
    gives up first: its server span still ends, marked, and nothing reached the model server."""
    silent_connections: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)

    redis = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = redis.sockets[0].getsockname()[1]
    traced(monkeypatch, receiver, "grpc")
    write_policy(
        policy_file,
        {"scope": scope(workload), "redisTimeoutMs": 30_000, "defaults": {"budget": {"daily": 10_000}}},
    )
    try:
        sidecar = await start_sidecar(policy=policy_file, redis_url=f"redis://127.0.0.1:{port}/0")
        async with client(sidecar, **{"X-Tenant-ID": "acme"}) as sdk:
            with pytest.raises(openai.APITimeoutError):
                await sdk.with_options(timeout=0.5).chat.completions.create(
                    model="fake", messages=MESSAGES, max_tokens=5
                )
        for _ in range(500):
            await exported(sidecar)
            if receiver.named(SERVICE, "server"):
                break
            await asyncio.sleep(0.01)
    finally:
        for writer in silent_connections:
            writer.close()
        redis.close()
    (server,) = receiver.named(SERVICE, "server")
    assert server.attributes["tokenscaler.client_gone"] is True
    assert server.attributes["http.response.status_code"] == 499
    assert receiver.named(SERVICE, "client") == []
    assert upstream.requests == []


async def test_anthropic_messages_are_spans_of_the_anthropic_provider(
    start_sidecar: StartSidecar, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced(monkeypatch, receiver, "grpc")
    hosted = FakeAnthropic()
    await hosted.start()
    try:
        sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{hosted.port}")
        async with (
            anthropic.AsyncAnthropic(
                base_url=f"http://127.0.0.1:{sidecar.port}", api_key="sk-ant-test", max_retries=0
            ) as sdk,
            sdk.messages.stream(
                model="claude-fake",
                max_tokens=9,
                messages=[{"role": "user", "content": "Count these tokens."}],
                extra_headers={"X-Fake-Cache-Read": "4"},
            ) as stream,
        ):
            final = await stream.get_final_message()
        await exported(sidecar)
    finally:
        await hosted.stop()
    server, call = pair(receiver)
    assert server.name == "POST /v1/messages" and call.name == "chat claude-fake"
    assert call.attributes["gen_ai.provider.name"] == call.attributes["gen_ai.system"] == "anthropic"
    assert call.attributes["gen_ai.usage.input_tokens"] == hosted.anthropic.prompt > 4
    assert (
        call.attributes["gen_ai.usage.output_tokens"]
        == final.usage.output_tokens
        == hosted.anthropic.generation
    )


async def test_an_unreachable_model_server_is_an_error(
    start_sidecar: StartSidecar, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from token_scaler.redis_conn import free_port

    traced(monkeypatch, receiver, "grpc")
    sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{free_port()}")
    async with client(sidecar) as sdk:
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=3)
    await exported(sidecar)
    server, call = pair(receiver)
    assert server.error and call.error
    assert server.attributes["http.response.status_code"] == 503
    assert call.attributes["error.type"] == "503"


async def test_policy_actions_and_refusals_are_on_the_server_span(
    start_sidecar: StartSidecar,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    policy_file: Path,
    workload: str,
) -> None:
    traced(monkeypatch, receiver, "grpc")
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "defaults": {
                "maxTokens": {"ceiling": 20},
                "rateLimit": {"tokensPerMinute": 6000, "burstSeconds": 1},
            },
            "tenants": {"strict": {"maxTokens": {"overCeiling": "reject"}}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    async with client(sidecar, **{"X-Tenant-ID": "acme"}) as sdk:
        await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=50)  # capped to 20
        with pytest.raises(openai.RateLimitError):  # 20 + the prompt, again and again: past the burst
            for _ in range(10):
                await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=20)
    async with client(sidecar, **{"X-Tenant-ID": "strict"}) as sdk:
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=50)
    await exported(sidecar)

    servers = receiver.named(SERVICE, "server")
    capped, *_, limited, refused = servers
    assert capped.attributes["tokenscaler.policy.actions"] == ["cap"]
    assert capped.attributes["tokenscaler.policy.cap"].startswith("20; action=")
    assert capped.attributes["tokenscaler.usage.output_tokens"] == 20
    assert not capped.error
    assert limited.attributes["tokenscaler.policy.actions"] == ["rate_limit"]
    assert limited.attributes["http.response.status_code"] == 429 and limited.error
    assert refused.attributes["tokenscaler.policy.actions"] == ["refuse"]
    assert refused.attributes["tokenscaler.policy.refusal"] == "max_tokens"
    assert refused.attributes["tokenscaler.tenant"] == "strict" and refused.error
    # A refused request never reached the model server: no client span for it.
    assert len(receiver.named(SERVICE, "client")) == len(servers) - 2


async def test_sampling_follows_the_configured_ratio(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # traceidratio keeps a trace when its id's low 64 bits fall below ratio x 2**64.
    traced(monkeypatch, receiver, "grpc", OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.5")
    sidecar = await start_sidecar()
    kept, dropped = "0" * 31 + "1", "1" + "f" * 31
    async with client(sidecar) as sdk:
        for trace_id in (kept, dropped):
            await sdk.chat.completions.create(
                model="fake",
                messages=MESSAGES,
                max_tokens=2,
                extra_headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
            )
            # Sampled or not, the model server gets the trace, flagged as it was decided.
            sent_id, _parent, sampled = forwarded(upstream)
            assert sent_id == trace_id and sampled == (trace_id == kept)
    await exported(sidecar)
    assert {span.trace_id for span in receiver.spans} == {kept}


async def test_sampling_off_exports_nothing(
    start_sidecar: StartSidecar, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced(monkeypatch, receiver, "http/protobuf", OTEL_TRACES_SAMPLER="always_off")
    sidecar = await start_sidecar()
    async with client(sidecar, traceparent=TRACEPARENT) as sdk:
        await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=2)
    await exported(sidecar)
    assert receiver.spans == [] and receiver.exports == 0


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "{endpoint}"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{endpoint}/v1/traces"},
    ],
    ids=["unconfigured", "sdk-disabled", "exporter-none"],
)
async def test_tracing_is_off_unless_configured(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(endpoint=receiver.endpoint("http/protobuf")))
    sidecar = await start_sidecar()
    assert sidecar.tracing is None and sidecar.proxy.tracing is None
    async with client(sidecar) as sdk:
        await sdk.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=2)
        assert forwarded_traceparent(upstream) is None
        # The client's own trace context passes through unchanged.
        await sdk.chat.completions.create(
            model="fake", messages=MESSAGES, max_tokens=2, extra_headers={"traceparent": TRACEPARENT}
        )
        assert forwarded_traceparent(upstream) == TRACEPARENT
    await sidecar.stop()
    assert receiver.exports == 0


def test_off_neither_the_sdk_nor_the_span_code_is_imported() -> None:
    # (redis-py imports the OpenTelemetry API by itself when it is installed.)
    loaded = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "sidecar.tracing", "gateway.tracing")
    code = (
        "import sys; import sidecar.server, gateway.server; from token_scaler import tracing; "
        "assert tracing.load('svc', {}) is None; "
        f"print(sorted(m for m in sys.modules if m.startswith({loaded!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_configured_without_the_packages_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    with pytest.raises(
        ConfigError, match=r"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318.*token-scaler\[tracing\]"
    ):
        tracing.load("svc", env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='udp'"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG='2'",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
            "OTEL_TRACES_SAMPLER_ARG='x'",
        ),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        tracing.TracingConfig.load("svc", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", **env})


def test_settings_read_the_standard_variables() -> None:
    config = tracing.TracingConfig.load(
        "svc",
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
            "OTEL_SERVICE_NAME": "llm-edge",
        },
    )
    assert config == tracing.TracingConfig(
        "llm-edge",
        "http/protobuf",
        "parentbased_traceidratio",
        0.01,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://collector:4318/v1/traces",
    )
    assert tracing.TracingConfig.load("svc", {"OTEL_TRACES_EXPORTER": "otlp"}) is not None
    assert tracing.TracingConfig.load("svc", {"OTEL_SERVICE_NAME": "x"}) is None
