"""What a non-streamed request costs when its client goes away before the answer (pure).

The sidecar then cancels the upstream request, but the model server has generated for as
long as the request ran, and a non-streamed request shows nothing of it: without a charge a
client could keep replicas busy and hang up just before each answer, spending no budget and
no rate limit, and leaving the scaler's demand short. So it is charged its prompt estimate
and an estimate of what was generated: the time it ran times the model's rate (generated
tokens per second of a request's life, learned from the model's answered requests), never
more than its reservation (n x max_tokens, or the arrival estimate); until a rate is known,
the reservation. A stream is charged what passed, counted as it passed.
"""

from __future__ import annotations

import math

ALPHA = 0.1  # weight of the newest answered request in a model's rate
MAX_MODELS = 1000  # rates kept (models come from requests)
ELAPSED, RESERVATION = "elapsed", "reservation"  # how an estimate was made


class Abandoned:
    def __init__(self) -> None:
        self._rates: dict[str, float] = {}

    def observe(self, model: str, generation: int, seconds: float) -> None:
        """An answered request: ``generation`` tokens in ``seconds`` from arrival to the end."""
        if seconds <= 0 or generation <= 0:
            return
        rate = generation / seconds
        known = self._rates.get(model)
        if known is None and len(self._rates) >= MAX_MODELS:
            return
        self._rates[model] = rate if known is None else known + ALPHA * (rate - known)

    def generation(self, model: str, seconds: float, reserved: int) -> tuple[int, str]:
        """Generated tokens to charge for a request abandoned after ``seconds``, and how."""
        rate = self._rates.get(model)
        if rate is None:
            return reserved, RESERVATION
        return min(reserved, math.ceil(rate * max(0.0, seconds))), ELAPSED
