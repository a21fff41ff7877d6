"""The scaler -> sidecar list of the models ScaledObjects count (version 1).

A ScaledObject with ``model: llama-8b`` counts only that model's tokens in its workload's
stream. The sidecars keep a bounded number of model names as labels (the rest count as
``other``), so they must know which names a ScaledObject depends on: those are labels
whatever else arrives. The scaler writes them once a second for every workload a ScaledObject
of its own namespace names, in the workload's hash slot::

    tokenscaler:v1:{<namespace>/<name>}:models

a JSON object ``{"v": 1, "models": ["llama-8b", ...]}`` set with ``PX 30000``. A reader
treats a missing or undecodable value as no names.
"""

from __future__ import annotations

import json

from token_scaler.record import KEY_PREFIX

VERSION = 1
TTL_MS = 30_000
MAX_NAMES = 32


def models_key(workload: str) -> str:
    return f"{KEY_PREFIX}:{{{workload}}}:models"


def encode(models: set[str]) -> bytes:
    return json.dumps({"v": VERSION, "models": sorted(models)[:MAX_NAMES]}, separators=(",", ":")).encode()


def decode(raw: bytes | str | None) -> list[str]:
    if raw is None:
        return []
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(doc, dict) or doc.get("v") != VERSION or not isinstance(doc.get("models"), list):
        return []
    return [m for m in doc["models"][:MAX_NAMES] if isinstance(m, str) and 0 < len(m) <= 128]
