"""HTTP beside the gRPC port: /debug/scalers, /metrics, /healthz, /readyz."""

from __future__ import annotations

import hmac
import json
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from scaler.registry import Registry


def make_app(
    registry: Registry, *, debug_token: str | None, ready: dict[str, bool], debug_open: bool = False
) -> web.Application:
    def refused(request: web.Request) -> web.Response | None:
        """Why /debug/* is not shown: it names workloads and tenants, so a token or an explicit
        --debug-open is required."""
        if not debug_token:
            if debug_open:
                return None
            return dump({"error": "the debug page needs the scaler's --debug-token (or --debug-open)"}, 403)
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {debug_token}".encode()):
            return None
        return dump({"error": "missing or wrong bearer token"}, 401)

    def dump(body: Any, status: int = 200) -> web.Response:
        return web.Response(
            text=json.dumps(body, indent=2) + "\n", status=status, content_type="application/json"
        )

    async def scalers(request: web.Request) -> web.Response:
        if (refusal := refused(request)) is not None:
            return refusal
        objects = [registry.describe(s) for _, s in sorted(registry.objects.items())]
        return dump({"redisTimeMs": registry.reader.now_ms(), "scaledObjects": objects})

    async def one(request: web.Request) -> web.Response:
        if (refusal := refused(request)) is not None:
            return refusal
        key = (request.match_info["namespace"], request.match_info["name"])
        state = registry.objects.get(key)
        if state is None:
            return dump({"error": f"KEDA has not asked about ScaledObject {key[0]}/{key[1]}"}, 404)
        return dump(registry.describe(state))

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if not ready["serving"]:
            return web.Response(text="shutting down\n", status=503)
        if not registry.reader.fresh():
            return web.Response(
                text=f"stale: {registry.reader.last_error or 'no Redis read yet'}\n", status=503
            )
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/debug/scalers", scalers)
    app.router.add_get("/debug/scalers/{namespace}/{name}", one)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
