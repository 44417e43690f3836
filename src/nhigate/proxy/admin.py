"""The admin port: health, readiness, metrics and the assertion JWKS, never on the proxied port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nhigate.proxy.state import STATE, ProxyState

ADMIN_STATE: web.AppKey[ProxyState] = web.AppKey("nhigate_admin_state", ProxyState)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process is serving its event loop."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: a valid policy is loaded and shutdown has not begun."""
    state = request.app[ADMIN_STATE]
    policy = state.holder.current
    if state.draining:
        return web.Response(status=503, text="draining\n")
    if policy is None:
        return web.Response(status=503, text="no valid policy loaded\n")
    return web.Response(text=f"ready {policy.version}\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's registry."""
    state = request.app[ADMIN_STATE]
    state.metrics.audit_dropped.set(state.audit.dropped)
    state.metrics.ready.set(1 if state.ready else 0)
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def jwks(request: web.Request) -> web.Response:
    """Public keys backends use to verify identity assertions."""
    signer = request.app[ADMIN_STATE].signer
    keys = signer.public_jwks() if signer is not None else {"keys": []}
    return web.json_response(keys, headers={"Cache-Control": "max-age=60"})


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin application, sharing state with the proxied-port app."""
    app = web.Application()
    app[ADMIN_STATE] = proxy_app[STATE]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/jwks.json", jwks)
    return app
