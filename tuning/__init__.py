"""Capacity planning and tuning: the simulator (``engine``, ``replica``), traces, policies, sweeps."""

from token_scaler.native import use_source_if_stale

use_source_if_stale(__name__)
