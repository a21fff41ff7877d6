"""Which workloads a ScaledObject may read: by default only those of its own namespace.

A ScaledObject names the workload whose streams it reads (``workload`` in its metadata), and a
ScaledObject with ``maxReplicas`` also decides that workload's saturation signal, which its
sidecars act on. Without a boundary, a team with a ScaledObject in one namespace could read
another namespace's demand and tenants, and flip its saturation flag. ``--allow-cross-namespace``
widens the default with rules ``<ScaledObject namespace>:<workload namespace>`` (``*`` for any,
``*`` alone for all); even then only ScaledObjects of the workload's own namespace decide its
saturation signal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$")


@dataclass(frozen=True)
class NamespaceAccess:
    rules: frozenset[tuple[str, str]] = frozenset()  # (ScaledObject's namespace, workload's)

    def allows(self, namespace: str, workload: str) -> bool:
        target = workload.split("/", 1)[0]
        if target == namespace:
            return True
        return any(
            rule_from in ("*", namespace) and rule_to in ("*", target) for rule_from, rule_to in self.rules
        )

    def refusal(self, namespace: str) -> str:
        return (
            f"a ScaledObject in namespace {namespace!r} may read only workloads of its own namespace "
            "(the scaler's --allow-cross-namespace widens that)"
        )


OWN_NAMESPACE = NamespaceAccess()


def parse_access(raw: str) -> NamespaceAccess:
    """``*``, or comma-separated ``<ScaledObject namespace>:<workload namespace>`` rules."""
    if raw.strip() == "*":
        return NamespaceAccess(frozenset({("*", "*")}))
    rules = set()
    for item in raw.split(","):
        source, colon, target = item.strip().partition(":")
        if not colon or not _NAME.match(source) or not _NAME.match(target):
            raise ValueError(
                f"{item.strip()!r}: expected '*' or rules '<ScaledObject namespace>:<workload namespace>' "
                "separated by commas ('*' for any namespace)"
            )
        rules.add((source, target))
    return NamespaceAccess(frozenset(rules))
