from __future__ import annotations

import openai

from tests.sidecar.conftest import StartSidecar, read_records, totals
from tests.sidecar.fake_upstream import FakeUpstream


async def test_smoke(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sidecar.port}/v1", api_key="x")
    r = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    print(r)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
    )
    async for chunk in stream:
        print(chunk)
    await client.close()
    sidecar.flusher.tick()
    await sidecar.flusher.deliver()
    records = read_records(redis_url, workload)
    print(records)
    print(totals(records), upstream.reported)
