"""``token-scaler demo``: the whole system in one process tree, on an embedded default."""
