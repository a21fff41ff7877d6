"""KEDA external scaler: answers KEDA with token-rate metrics read from the sidecars' Redis streams."""

from token_scaler.native import use_source_if_stale

use_source_if_stale(__name__)
