"""The policy file in force: reloaded when its content changes, and the timings it sets."""

from __future__ import annotations

import logging
from pathlib import Path

from sidecar.policy import schema
from sidecar.policy.metrics import PolicyMetrics
from sidecar.policy.schema import Policy
from token_scaler.errors import ConfigError

log = logging.getLogger(__name__)


class PolicyFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._content = self._read()
        self.policy: Policy = schema.load(path)  # ConfigError at start-up
        self.generation = 0  # reloads that changed the policy

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def reload(self, metrics: PolicyMetrics) -> bool:
        """Load the file again if it changed; a bad file keeps the policy in force (each
        reload is counted in ``metrics.reloads``).

        The content is compared, not only the mtime: an edit within the filesystem's
        timestamp granularity, or a ConfigMap's symlink swap, is seen all the same.
        """
        content = self._read()
        if content is None or content == self._content:
            return False
        self._content = content
        try:
            policy = schema.load(self.path)
        except ConfigError as exc:
            metrics.reloads.labels("error").inc()
            log.error("policy reload failed, the previous policy stays in force: %s", exc)
            return False
        self.policy = policy
        self.generation += 1
        metrics.reloads.labels("ok").inc()
        log.info("policy reloaded from %s", self.path)
        return True

    @property
    def announces(self) -> bool:
        """Sidecars count each other when they share a limit: a rate limit's share while Redis
        is away, and a chunk's share of a budget or burst."""
        return self.policy.rate_limited or self.policy.chunks.enabled

    @property
    def background_timeout_s(self) -> float:
        """Calls off the request path (pings, renewals, corrections) may wait a little longer."""
        return max(self.policy.redis_timeout_s, 1.0)

    @property
    def draw_window_s(self) -> float:
        """How long after its grant (or the last renewal Redis confirmed) a chunk admits: half
        its lease, so no other sidecar can have released it meanwhile, whatever happens to Redis."""
        return self.policy.lease_s / 2

    def renew_every_s(self, tick_s: float) -> float:
        """A third of the lease; with chunks, often enough that a chunk's draw window (half
        the lease) is pushed on before it ends, a tick and a call's timeout included."""
        every = self.policy.lease_s / 3
        if self.policy.chunks.enabled:
            every = min(every, self.draw_window_s - tick_s - self.background_timeout_s)
        return max(0.0, every)
