"""token-scaler gateway: an OpenAI-compatible entry point that holds requests while a workload
has no replica and routes by tokens."""
