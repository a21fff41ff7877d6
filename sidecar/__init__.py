"""The token-metering sidecar: an aiohttp reverse proxy beside a model server (``token-scaler sidecar``)."""
