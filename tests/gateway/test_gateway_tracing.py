"""One trace from the client through the gateway and the sidecar to the model server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from gateway.server import Gateway
from sidecar.server import Sidecar
from tests.gateway.conftest import StartGateway, StartReplica, only
from tests.gateway.test_gateway_hold import client, wait_for
from tests.otlp_receiver import OtlpReceiver
from tests.sidecar.test_tracing import PARENT_ID, TRACE_ID, TRACEPARENT, forwarded, receiver, traced

__all__ = ["receiver"]  # the fixture

GATEWAY = "token-scaler-gateway"
SIDECAR = "token-scaler-sidecar"


async def exported(*services: Gateway | Sidecar) -> None:
    for service in services:
        assert service.tracing is not None
        assert await asyncio.to_thread(service.tracing.flush)


async def test_a_held_request_is_one_trace_from_the_gateway_to_the_model_server(
    start_gateway: StartGateway,
    start_replica: StartReplica,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traced(monkeypatch, receiver, "grpc")
    gateway = await start_gateway()
    sdk = client(gateway.port, default_headers={"traceparent": TRACEPARENT})
    call = asyncio.create_task(sdk.completions.create(model="fake", prompt="trace me " * 10, max_tokens=6))
    await wait_for(lambda: len(only(gateway).queue) == 1, what="the request held")
    replica = await start_replica()
    answer = await call
    await sdk.close()
    assert answer.usage is not None
    await exported(gateway, replica.sidecar)

    [edge] = receiver.named(GATEWAY, "server")
    [attempt] = receiver.named(GATEWAY, "client")
    [proxy] = receiver.named(SIDECAR, "server")
    [inference] = receiver.named(SIDECAR, "client")
    chain = [edge, attempt, proxy, inference]
    assert {span.trace_id for span in chain} == {TRACE_ID}
    assert [span.parent_id for span in chain] == [PARENT_ID, edge.span_id, attempt.span_id, proxy.span_id]
    assert forwarded(replica.upstream) == (TRACE_ID, inference.span_id, True)

    assert edge.name == attempt.name == "POST /v1/completions"
    assert edge.attributes["tokenscaler.held"] is True
    assert edge.attributes["tokenscaler.hold_seconds"] > 0
    assert edge.events == ["routed"]
    assert edge.attributes["tokenscaler.model"] == "fake" and edge.attributes["tokenscaler.attempts"] == 1
    assert edge.attributes["http.response.status_code"] == 200 and not edge.error
    assert attempt.attributes["server.port"] == replica.sidecar.port
    assert attempt.attributes["tokenscaler.outcome"] == "done"
    assert inference.attributes["gen_ai.operation.name"] == "text_completion"
    assert inference.attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert inference.attributes["gen_ai.usage.output_tokens"] == 6 == answer.usage.completion_tokens


async def test_a_refusal_is_the_gateway_span_s_error(
    start_gateway: StartGateway,
    start_replica: StartReplica,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traced(monkeypatch, receiver, "http/protobuf")
    await start_replica()
    gateway = await start_gateway()
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    async with client(gateway.port) as sdk:
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    await exported(gateway)
    [edge] = receiver.named(GATEWAY, "server")
    assert edge.error and edge.attributes["tokenscaler.refusal"] == "model_not_found"
    assert edge.attributes["http.response.status_code"] == 404
    assert edge.attributes["tokenscaler.attempts"] == 0 and edge.attributes["tokenscaler.held"] is False
    assert receiver.named(GATEWAY, "client") == []
