"""The saturation loop across both components: the scaler publishes, the sidecar downgrades.

A real scaler (gRPC, as KEDA calls it) and a real sidecar with a ``whenSaturated`` downgrade
rule share a real Redis: when the demand asks for ``maxReplicas``, requests go to the cheaper
model; when the ceiling is raised, they come back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import redis

from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from sidecar.server import Sidecar
from tests.keda import FakeSidecar, KedaClient
from tests.sidecar.conftest import StartSidecar, scope
from tests.sidecar.fake_upstream import FakeUpstream
from tests.sidecar.policy.test_policy_proxy import MESSAGES, sdk, write_policy


async def ask(sidecar: Sidecar) -> str | None:
    assert sidecar.policy is not None
    await sidecar.policy.tick()  # the sidecar reads the signal once a second; now, for the test
    async with sdk(sidecar, "acme") as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="large", messages=MESSAGES, max_tokens=5
        )
    return raw.headers.get("x-tokenscaler-model")


async def test_scaler_saturation_downgrades_and_recovers(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    write_policy(
        policy_file,
        {"scope": scope(workload), "downgrade": {"large": {"to": "small", "whenSaturated": True}}},
    )
    sidecar = await start_sidecar(policy=policy_file)
    # Six replicas' worth of demand, served as fast as it arrives (no queue).
    sync = redis.Redis.from_url(redis_url)
    peer = FakeSidecar(sync, workload, "peer")
    now = peer.now_ms()
    for i in range(30, 0, -1):
        peer.flush(now - i * 1000 + 1000, sg=600)
    scaler = ScalerServer(ScalerConfig(grpc_port=0, http_port=0, host="127.0.0.1", redis_url=redis_url))
    await scaler.start()
    ns, name = workload.split("/")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel:
            keda = KedaClient(channel, "scaler:9090")
            base = {"tokensPerSecondPerReplica": "100", "headroom": "1"}
            assert await ask(sidecar) is None
            answer = await keda.poll(ns, name, {**base, "maxReplicas": "4"})
            assert answer.replicas >= 4
            header = None
            for _ in range(30):  # the scaler publishes once a second
                header = await ask(sidecar)
                if header:
                    break
                await asyncio.sleep(0.2)
            assert header == "small; from=large; reason=saturated"
            await keda.poll(ns, name, {**base, "maxReplicas": "50"})  # the ceiling is raised
            for _ in range(30):
                header = await ask(sidecar)
                if header is None:
                    break
                await asyncio.sleep(0.2)
            assert header is None
    finally:
        await scaler.stop()
        sync.close()
