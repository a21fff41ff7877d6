"""token-scaler: autoscale LLM inference on tokens, not requests.

This package holds what both components share: the stream record contract
(``record``), settings (``config``), the error hierarchy (``errors``), Redis
connections (``redis_conn``) and the command line (``cli``).
"""

__version__ = "0.1.0"
