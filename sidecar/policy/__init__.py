"""Cost-control policies enforced in the sidecar's request path (``--policy``).

Pure decisions in small modules (``schema`` the file, ``identity`` the tenant, ``caps``
max_tokens, ``budgets`` costs and periods, ``ratelimit`` GCRA, ``downgrade`` the model,
``admission`` them together, ``refusals`` the answers, ``chunks`` reservations made ahead),
the Redis state in ``store`` (the Lua scripts in ``lua/``, loaded by ``scripts``), the
collaborators that own the engine's state (``settlement``, ``ahead``, ``failopen``,
``usage``, ``upkeep``, ``reserve``, ``policyfile``), and ``engine`` to order them for the
proxy: ``admit`` before forwarding, ``settle`` after.
"""

from sidecar.policy.engine import Admission, PolicyEngine, Rejection
from sidecar.policy.schema import Policy, load, parse

__all__ = ["Admission", "Policy", "PolicyEngine", "Rejection", "load", "parse"]
