"""``token-scaler profile`` against the real llama-server: two short steps, real usage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import CONTEXT, LlamaServer
from tuning import profile

pytestmark = pytest.mark.e2e


def test_profile_measures_the_real_server(llama_server: LlamaServer, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    code = profile.main(
        [
            "--url", llama_server.base_url,
            "--model", llama_server.model,
            "--concurrency", "1,2",
            "--step-seconds", "8",  # on a busy machine a 3 s step may end no request
            "--prompt-tokens", "48",
            "--output-tokens", "16",
            "--ttft-p95", "30",
            "--itl-p95", "5",
            "--json", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert code == 0, doc
    for step in doc["steps"]:
        assert step["requests"] > 0 and step["errors"] == 0
        assert step["prompt_tps"] > 0 and step["generation_tps"] > 0
        assert step["mean_output"] == pytest.approx(16)  # ignore_eos is honoured
    assert doc["recommendation"]["tokensPerSecondPerReplica"] > 0
    assert doc["replica"]["prefill_tokens_per_s"] > 0 and doc["replica"]["step_base_s"] > 0
    # the KV cache as llama-server's /props says it: --ctx-size split over --parallel slots
    assert doc["replica"]["kv_cache_tokens"] == CONTEXT
    assert "KV cache 2048 tokens (/props: n_ctx 1024 x 2 slots)" in doc["fit_notes"]
