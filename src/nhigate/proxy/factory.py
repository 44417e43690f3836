"""The proxied-port application, assembled: state, front end, upstream pools, authenticator.

`create_app` builds the `ProxyState` every front end shares, the aiohttp front end
(`app.ProxyHandler`), the HTTP/2 gateway when the backend speaks HTTP/2, and the cleanup
contexts that start and stop the audit writer, the upstream pools, the authenticator and the
WebSocket re-checks. `server.run` serves it; tests and benches call `create_app` directly.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from nhigate.policy import Policy
from nhigate.proxy.app import PIPELINE, ProxyHandler, setup_pipeline
from nhigate.proxy.audit import AuditLog
from nhigate.proxy.bodies import BUFFERED_BODY_LIMIT
from nhigate.proxy.forward import UpstreamPool
from nhigate.proxy.http2 import HTTP2_GATEWAY, Http2Gateway
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import PolicyHolder
from nhigate.proxy.settings import ProxySettings
from nhigate.proxy.state import (
    STATE,
    AssertionSigning,
    Authenticating,
    Clock,
    ProxyState,
)
from nhigate.proxy.websocket import RECHECK_INTERVAL

AuthenticatorFactory = Callable[[ProxySettings, aiohttp.ClientSession, Clock], Authenticating]
SignerFactory = Callable[[ProxySettings], AssertionSigning]


def default_authenticator(
    settings: ProxySettings, session: aiohttp.ClientSession, clock: Clock
) -> Authenticating:
    """The real `nhigate.proxy.authn.Authenticator`, starting with no issuers."""
    from nhigate.proxy.authn import Authenticator

    return Authenticator((), session=session, clock=clock, cache_size=settings.token_cache_size)


def default_signer(settings: ProxySettings) -> AssertionSigning:
    """The real assertion signer (ephemeral key when `--assertion-key` is not given)."""
    from nhigate.proxy.assertion import AssertionSigner

    pem = settings.assertion_key.read_bytes() if settings.assertion_key is not None else None
    return AssertionSigner(pem)


def create_app(
    settings: ProxySettings,
    *,
    holder: PolicyHolder | None = None,
    metrics: ProxyMetrics | None = None,
    audit: AuditLog | None = None,
    clock: Clock = time.time,
    authenticator_factory: AuthenticatorFactory = default_authenticator,
    signer_factory: SignerFactory = default_signer,
) -> web.Application:
    """The proxied-port application. Policy sources are attached separately (`server.run`).

    `holder`, `metrics`, `audit` and `clock` are shared with the admin app and the policy
    sources; tests inject them (and a clock) to drive the proxy deterministically.
    """
    state = ProxyState(
        settings=settings,
        holder=holder if holder is not None else PolicyHolder(),
        metrics=metrics if metrics is not None else ProxyMetrics(),
        audit=audit if audit is not None else AuditLog.open(settings.audit_log),
        clock=clock,
        signer=signer_factory(settings),
    )
    app = web.Application(client_max_size=max(settings.max_body_bytes, BUFFERED_BODY_LIMIT))
    app[STATE] = state
    pipeline = ProxyHandler(state)
    app[PIPELINE] = pipeline
    app.cleanup_ctx.append(_audit_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_authn_ctx(authenticator_factory))
    app.cleanup_ctx.append(_websocket_ctx)
    if settings.upstream_protocol == "http2":
        app[HTTP2_GATEWAY] = Http2Gateway(pipeline)
        app.cleanup_ctx.append(_http2_ctx)
    setup_pipeline(app, pipeline)
    return app


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.audit.start()
    yield
    state.metrics.audit_dropped.set(state.audit.dropped)
    await state.audit.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    settings = state.settings
    upstream = settings.upstream
    ssl_context = ssl.create_default_context() if upstream.scheme == "https" else None
    state.pool = UpstreamPool(
        upstream.host,
        upstream.port,
        ssl_context=ssl_context,
        max_idle=settings.upstream_pool_size,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.upstream_timeout,
    )
    state.upstream_ssl = ssl_context
    yield
    await state.pool.close()


async def _http2_ctx(app: web.Application) -> AsyncIterator[None]:
    """The HTTP/2 upstream pool the HTTP/2 front forwards through (h2_upstream.py)."""
    from nhigate.proxy.h2_upstream import H2UpstreamPool

    gateway = app[HTTP2_GATEWAY]
    settings = app[STATE].settings
    pool = H2UpstreamPool(
        settings.upstream,
        ssl_context=None,  # https: the pool's own context, ALPN h2
        connect_timeout=settings.connect_timeout,
        upstream_timeout=settings.upstream_timeout,
    )
    gateway.pool = pool
    try:
        yield
    finally:
        gateway.pool = None
        await pool.close()


async def _websocket_ctx(app: web.Application) -> AsyncIterator[None]:
    """Re-check open WebSockets on every policy swap, and every `RECHECK_INTERVAL` those whose
    grant or token expiry has come; on shutdown, close them with 1001 before aiohttp waits
    for handlers."""
    state = app[STATE]
    tunnels = state.tunnels
    state.holder.subscribe(lambda policy: tunnels.recheck(policy, state.clock()))

    async def tick() -> None:
        while True:
            await asyncio.sleep(RECHECK_INTERVAL)
            tunnels.recheck(state.holder.current, state.clock(), due_only=True)

    async def on_shutdown(app: web.Application) -> None:
        tunnels.shut_all()

    app.on_shutdown.append(on_shutdown)
    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        tunnels.shut_all()


def _authn_ctx(
    factory: AuthenticatorFactory,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            authenticator = factory(state.settings, session, state.clock)
            state.authenticator = authenticator

            def on_swap(policy: Policy) -> None:
                authenticator.update_issuers(policy.document.issuers)
                state.metrics.set_policy_version(policy.version)
                state.metrics.ready.set(1 if state.ready else 0)

            state.holder.subscribe(on_swap)
            await authenticator.start()
            stats = getattr(authenticator, "stats", None)
            if stats is not None and hasattr(stats, "jwks_refresh"):
                state.metrics.watch_jwks_refreshes(lambda: dict(stats.jwks_refresh))
            try:
                yield
            finally:
                await authenticator.close()

    return ctx
