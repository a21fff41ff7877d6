"""Cost-control policies enforced in the sidecar's request path (``--policy``).

Pure decisions in small modules (``schema`` the file, ``identity`` the tenant, ``caps``
max_tokens, ``budgets`` costs and periods, ``ratelimit`` GCRA, ``downgrade`` the model),
the Redis state in ``store`` (one Lua script to admit, one to settle), and ``engine`` to
join them for the proxy: ``admit`` before forwarding, ``settle`` after.
"""

from sidecar.policy.engine import Admission, PolicyEngine, Rejection
from sidecar.policy.schema import Policy, load, parse

__all__ = ["Admission", "Policy", "PolicyEngine", "Rejection", "load", "parse"]
