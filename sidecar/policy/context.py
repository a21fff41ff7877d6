"""What every collaborator of the policy engine reads: the store, the metrics, the policy, the clock."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.clock import Clock
from sidecar.policy.metrics import PolicyMetrics
from sidecar.policy.policyfile import PolicyFile
from sidecar.policy.store import Store


@dataclass(frozen=True, slots=True)
class Context:
    store: Store  # the scripts and commands, over the engine's one pipelined channel
    metrics: PolicyMetrics
    file: PolicyFile  # the policy in force (``file.policy``) and the timings it sets
    clock: Clock
