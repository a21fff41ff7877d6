"""token-scaler: autoscale LLM inference on tokens, not requests.

The kernel: what every other package shares, importing none of them. The stream
record contract (``record``) and the other Redis keys (``presence``, ``saturation``,
``model_keys``), settings (``config``), the error hierarchy (``errors``), Redis
connections (``redis_conn``, ``redis_channel``), the price table (``pricing``), and
the command line (``cli``), which loads a subcommand's package by name only when it runs.
"""

__version__ = "0.1.0"
