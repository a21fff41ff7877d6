"""KEDA external scaler: answers KEDA with token-rate metrics read from the sidecars' Redis streams."""
