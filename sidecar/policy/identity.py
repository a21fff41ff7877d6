"""Who is asking: the tenant of a request (pure).

Two sources, never both:
- with ``identity.apiKeys`` in the policy, the API key (``Authorization: Bearer``,
  ``api-key``, or Anthropic's ``x-api-key``) hashed with sha256 and looked up; an unknown
  or missing key is the default tenant. The tenant header is then ignored, so a client
  cannot pick whose budget it spends;
- without it, the tenant header, which a trusted gateway in front of the sidecar sets.
A value that is not a valid tenant name (``[A-Za-z0-9._:@-]{1,128}``) is the default tenant.

The key itself is never stored, logged or kept: only its digest is compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from sidecar.policy.schema import TENANT, Policy


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in ("api-key", "x-api-key"):
        key = headers.get(name)
        if key is not None and key.strip():
            return key.strip()
    return None


def tenant_of(policy: Policy, headers: Mapping[str, str], tenant_header: str) -> str:
    """The tenant a request spends for; ``tenant_header`` is the sidecar's when the policy names none."""
    if policy.api_keys:
        key = api_key(headers)
        if key is None:
            return policy.default_tenant
        return policy.api_keys.get(key_digest(key), policy.default_tenant)
    claimed = headers.get(policy.tenant_header or tenant_header)
    if claimed is None or not TENANT.match(claimed):
        return policy.default_tenant
    return claimed
