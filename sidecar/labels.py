"""Which model names become Prometheus and stream-record labels (the rest count as ``other``).

Model names come from request bodies: a client can send any number of them. A name becomes a
label only once the model server has answered a request for it successfully (so names the
server refuses never take a slot), up to ``limit``, first come first served; or, with an
allow-list (``--models``), exactly the names listed. The names ScaledObjects count
(``model`` in their metadata, published by the scaler: token_scaler/model_keys.py) are labels
whatever else arrived first, so a ScaledObject never sees its model as ``other``. A model's
request is counted as ``other`` until the server answers it (its status line): then it moves to
its label (meter.relabel), while requests sent meanwhile stay ``other``. ``unknown`` (no
``model`` in the body) is always a label.
"""

from __future__ import annotations

from collections.abc import Iterable

OTHER, UNKNOWN = "other", "unknown"
MAX_PINNED = 32  # names ScaledObjects count, beyond the limit (the record holds 64 per entry)


class ModelLabels:
    def __init__(self, limit: int, allowed: Iterable[str] | None = None, max_length: int = 128) -> None:
        self._limit = limit
        self._allowed = frozenset(allowed) if allowed is not None else None
        self._max_length = max_length
        self._confirmed: set[str] = set(self._allowed or ())
        self._pinned: set[str] = set()

    def __call__(self, name: str) -> str:
        """The label a request for ``name`` counts under."""
        if name in self._confirmed or name in self._pinned or name == UNKNOWN:
            return name
        return OTHER

    def confirm(self, name: str) -> str:
        """The model server answers a request for ``name`` successfully: its label from now on."""
        if self._allowed is None and name not in self._confirmed and self._fits(name):
            self._confirmed.add(name)
        return self(name)

    def _fits(self, name: str) -> bool:
        return (
            len(self._confirmed) < self._limit
            and len(name) <= self._max_length
            and name.isprintable()
            and name != OTHER
        )

    def pin(self, names: Iterable[str]) -> None:
        """Names ScaledObjects count: labels from now on (they are not taken back: a series stays)."""
        for name in names:
            if len(self._pinned) >= MAX_PINNED:
                return
            if name != OTHER and len(name) <= self._max_length and name.isprintable():
                self._pinned.add(name)
