"""`ProxyRunner`: serves a `create_app()` application with the pipeline as the handler.

The runner swaps aiohttp's router for the pipeline, audits parser refusals from their own
request class and guards client connections (connections.py; with an HTTP/2 upstream
every connection is dispatched to http2.py); the application, its
pipeline and its state are app.py's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nhigate.proxy.aiohttp_seam import (
    PARSER_ERROR_MESSAGE,
    AdaptingRunner,
    RefusalAudit,
    refusal_auditing_factory,
)
from nhigate.proxy.app import PIPELINE
from nhigate.proxy.connections import GuardedServer
from nhigate.proxy.http2 import HTTP2_GATEWAY, Http2Gateway
from nhigate.proxy.state import STATE, ProxyState


class ProxyRunner(AdaptingRunner):
    """Runs a `create_app()` application with the pipeline as the HTTP server's handler.

    The application's router and middleware chain are skipped: with no routes, aiohttp
    builds a not-found match (an `HTTPNotFound`) and re-wraps the middleware for every
    request, about a sixth of the proxy's CPU per request. The pipeline already handles
    every method and target itself (and answers `Expect: 100-continue` only once the
    request is authorised). Startup/cleanup contexts, runner options and graceful
    shutdown are aiohttp's own. A plain `web.AppRunner` still works, through the router.

    Given `rejects.rejected_request_audit(app)`'s options, requests the HTTP parser refused
    are audited from their own request class instead of by an access logger, which aiohttp
    would call for every request.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        refusal_audit: RefusalAudit | None = getattr(
            kwargs.get("access_log_class"), "audit_refusal", None
        )
        if refusal_audit is not None and PARSER_ERROR_MESSAGE is not None:
            kwargs["access_log"] = None  # the request factory below audits refusals
        else:
            refusal_audit = None
        self._refusal_audit = refusal_audit
        super().__init__(app, **kwargs)

    def adapt(self, server: web.Server) -> web.Server:
        # The application's request factory still builds every request: a `web.Request`.
        server.request_handler = self.app[PIPELINE].handle  # type: ignore[assignment]
        if self._refusal_audit is not None:
            server.request_factory = refusal_auditing_factory(self.app, self._refusal_audit)
        return _guarded(server, self.app[STATE], self.app.get(HTTP2_GATEWAY))


def _guarded(
    server: web.Server, state: ProxyState, http2: Http2Gateway | None = None
) -> GuardedServer:
    """`server` with the client-connection limits of `state.settings` (connections.py)."""
    limits, audit = state.connection_rules()
    return GuardedServer(server, limits, audit, http2)
