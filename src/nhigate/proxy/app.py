"""The aiohttp HTTP/1.1 front end: every request is authenticated, authorised, audited, forwarded.

`ProxyHandler` runs the front-end-neutral stages of `pipeline.Pipeline` on aiohttp's
`web.Request` and adds what only this front end serves (MCP exchanges, WebSocket tunnels,
streamed and buffered bodies). `factory.create_app` builds it; `http1.py` (native HTTP/1.1)
and `http2.py` are the other front ends over the same stages.

The pipeline, in order (`ProxyHandler._pipeline` reads top to bottom):

1. request id;
2. request target: CONNECT/TRACE and anything but origin-form refused, the path
   normalised once (the query is kept untouched) -> 400 `request_rejected`/`path_rejected`;
3. policy loaded? -> 503 `no_policy`;
4. authenticate (bearer token or SPIFFE ID from the client certificate) -> 401;
5. tenant: header and claim must agree -> 403 `tenant_mismatch`;
   method/path overrides (`X-HTTP-Method-Override`, `X-Original-URL`, `?_method=`; form-body
   `_method` while the body is read in 8.) -> 400 `override_rejected` (`overrides.py`);
   `Upgrade`: only a WebSocket handshake to a declared path -> 400 `upgrade_rejected`;
6. `decide()` on the normalised path with the proxy's own clock (and on the override, when
   the service declares that its backend honours them) -> 403;
7. token bucket per (identity, grant) -> 429 with `Retry-After`;
8. forward exactly the authorised path (+ query) with filtered headers -> 413/502/504
   (a WebSocket: the handshake, then bytes both ways once the backend switched, `websocket.py`);
9. one audit line and metrics, for every outcome above.

Any unexpected exception denies with 500 `internal_error` (fail closed) and is audited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import HttpVersion11, web

from nhigate.policy import (
    Identity,
    Policy,
    Reason,
)
from nhigate.policy.document import ServiceConfig
from nhigate.policy.mcp import mcp_endpoint_of, mcp_scope
from nhigate.proxy.bodies import (
    BUFFERED_BODY_LIMIT,
    UPSTREAM_FAILURES,
    check_form,
    content_length,
    limited,
    request_head,
    upstream_denial,
)
from nhigate.proxy.forward import (
    IDEMPOTENT_METHODS,
    RequestBody,
    UnsafeHeadError,
    UpstreamResponse,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    chunked,
    serialise_head,
)
from nhigate.proxy.headers import (
    REQUEST_ID,
    filter_response_headers,
)
from nhigate.proxy.mcp import (
    McpAuthorised,
    McpDeniedError,
    McpGate,
    McpUpstreamError,
)
from nhigate.proxy.overrides import (
    form_kind,
)
from nhigate.proxy.pipeline import (
    DenyError,
    Exchange,
    Pipeline,
)
from nhigate.proxy.state import (
    ProxyState,
)
from nhigate.proxy.websocket import (
    Backend,
    BackendAnswer,
    ClientSide,
    Tunnel,
    UpgradeRefusedError,
    connect_backend,
    declared_path,
    handshake_key,
    switched,
    token_expiry,
)

log = logging.getLogger(__name__)

_BODY_FAILURES: tuple[type[Exception], ...] = (*UPSTREAM_FAILURES, aiohttp.ClientPayloadError)
"""What sending upstream raises here: aiohttp's body reader adds its payload error."""


def _json_error(
    status: int,
    reason: Reason,
    request_id: str,
    headers: dict[str, str] | None,
    body: bytes | None = None,
) -> web.Response:
    if body is None:
        body = orjson.dumps({"error": reason.value, "request_id": request_id})
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.headers[REQUEST_ID] = request_id
    if headers:
        resp.headers.update(headers)
    return resp


class ProxyHandler(Pipeline):
    """The catch-all HTTP/1.1 request handler: the pipeline described in the module docstring."""

    def __init__(self, state: ProxyState) -> None:
        super().__init__(state)
        self._mcp = McpGate(self._max_body, state.mcp_sessions)

    async def handle(
        self, request: web.Request, *, answers_expect: bool = True
    ) -> web.StreamResponse:
        """Proxy `request`; `answers_expect=False` when aiohttp's router has already
        answered its `Expect: 100-continue` (`setup_pipeline`)."""
        state = self.state
        state.inflight += 1
        ex = Exchange(
            request_id=self.request_ids(),
            started=time.perf_counter(),
            now=state.clock(),
            method=request.method,
            path="",
            answers_expect=answers_expect,
        )
        try:
            return await self._pipeline(request, ex)
        except DenyError as denied:
            return self._deny(ex, denied)
        except Exception as exc:  # fail closed: deny and audit, never crash
            log.exception("internal error handling request %s", ex.request_id)
            return self._deny(ex, DenyError(Reason.INTERNAL_ERROR, type(exc).__name__))
        finally:
            state.inflight -= 1

    async def _pipeline(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        path, query, authorization = self.target(request, ex)
        policy, identity = await self.identify(request, ex, query, authorization)
        service = policy.document.service
        websocket_key: str | None = None
        if "Upgrade" in request.headers:
            websocket_key = self._upgrade(request, ex, service, path)
        if service.mcp_endpoints:
            endpoint = mcp_endpoint_of(service, path)
            if endpoint is not None:  # decided per JSON-RPC message, never by path rules
                if ex.override is not None:  # MCP rules cannot authorise another method/path
                    raise DenyError(Reason.OVERRIDE_REJECTED, "override on an MCP endpoint")
                return await self._mcp_exchange(request, ex, policy, identity, endpoint, query)
        self.admit(policy, ex, identity, path)
        if websocket_key is not None:
            return await self._websocket(request, ex, policy, path, query, websocket_key)
        return await self._forward(request, ex, policy, path, query)

    # -- stages ----------------------------------------------------------------------------

    async def _mcp_exchange(
        self,
        request: web.Request,
        ex: Exchange,
        policy: Policy,
        identity: Identity,
        endpoint: str,
        query: str,
    ) -> web.StreamResponse:
        """An MCP endpoint request: `nhigate.proxy.mcp` reads and decides the body."""
        scope = mcp_scope(policy, identity, endpoint, ex.now, ex.tenant)
        try:
            authorised = await self._mcp.authorise(
                request, ex.request_id, scope, identity, query, answers_expect=ex.answers_expect
            )
        except McpDeniedError as denied:
            ex.decision, ex.mcp = denied.decision, denied.audit
            raise DenyError(denied.reason, denied.detail, body=denied.body) from None
        ex.decision, ex.mcp = authorised.decision, authorised.audit
        service = policy.document.service
        if authorised.decision.rate_limit is not None or service.rate_limit is not None:
            self.rate_limit(service, identity, authorised.decision)
        return await self._forward(request, ex, policy, ex.path, "", mcp=authorised)

    def _upgrade(
        self, request: web.Request, ex: Exchange, service: ServiceConfig, path: str
    ) -> str:
        """The `Sec-WebSocket-Key` of an upgrade the proxy relays; any other upgrade request
        is refused (`websocket.py`)."""
        try:
            key = handshake_key(request.method, request.version == HttpVersion11, request.headers)
        except UpgradeRefusedError as exc:
            raise DenyError(Reason.UPGRADE_REJECTED, str(exc)) from None
        if not declared_path(service.websocket_paths, path):
            raise DenyError(Reason.UPGRADE_REJECTED, "path is not a declared WebSocket path")
        if service.mcp_endpoints and mcp_endpoint_of(service, path) is not None:
            raise DenyError(Reason.UPGRADE_REJECTED, "WebSocket on an MCP endpoint")
        if ex.override is not None:
            raise DenyError(Reason.UPGRADE_REJECTED, "override on a WebSocket handshake")
        return key

    async def _forward(
        self,
        request: web.Request,
        ex: Exchange,
        policy: Policy,
        path: str,
        query: str,
        mcp: McpAuthorised | None = None,
    ) -> web.StreamResponse:
        state = self.state
        pool = state.pool
        assert pool is not None
        identity = ex.identity
        decision = ex.decision
        assert identity is not None
        assert decision is not None
        length = request.content_length
        if length is not None and length > self._max_body:
            raise DenyError(Reason.BODY_TOO_LARGE, f"Content-Length {length} > {self._max_body}")
        headers = self.upstream_headers(request, ex, policy.document.service, identity, decision)
        body: RequestBody = None
        if mcp is not None:
            body = mcp.body  # exactly the bytes that were parsed and authorised
            if body:
                headers.append(("Content-Length", str(len(body))))
        elif (
            ex.answers_expect
            and request.body_exists
            and "Expect" in request.headers
            and request.version >= HttpVersion11
        ):
            # Only now, authorised: the caller may send its body (`_target` checked the value).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        if mcp is not None:
            pass
        elif length is not None and length > 0:
            headers.append(("Content-Length", str(length)))
            form = form_kind(request.headers.get("Content-Type", ""))
            if length <= BUFFERED_BODY_LIMIT:
                body = await request.read()
                if form is not None:
                    check_form(body, form)
            else:
                body = limited(request.content.readany, self._max_body, form)
        elif length is None and request.body_exists:
            headers.append(("Transfer-Encoding", "chunked"))
            form = form_kind(request.headers.get("Content-Type", ""))
            body = chunked(limited(request.content.readany, self._max_body, form))
        elif request.method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", "0"))
        head = request_head(ex.method, path + query, headers)
        sent = time.perf_counter()
        try:
            upstream = await pool.request(
                head, body, is_head=ex.method == "HEAD", idempotent=ex.method in IDEMPOTENT_METHODS
            )
        except _BODY_FAILURES as exc:
            raise upstream_denial(exc, self._max_body) from None
        state.metrics.upstream_duration.observe(time.perf_counter() - sent)
        if mcp is not None:
            try:
                return await mcp.responder.respond(
                    request,
                    upstream,
                    lambda status, detail: self.audit_allowed(ex, status, detail),
                    lambda: _abort(request),
                )
            except McpUpstreamError as exc:
                raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc)) from None
        if upstream.body is not None and ex.method != "HEAD":
            return self._respond_buffered(ex, upstream, upstream.body)
        return await self._respond(request, ex, upstream)

    async def _websocket(
        self,
        request: web.Request,
        ex: Exchange,
        policy: Policy,
        path: str,
        query: str,
        key: str,
    ) -> web.StreamResponse:
        """Forward an authorised handshake; relay bytes only once the backend switched."""
        backend, answer = await self._handshake_upstream(request, ex, policy, path + query)
        if not switched(answer.status, answer.headers, key):
            backend.close()  # whatever the backend sends next is never relayed
            if answer.status == 101:
                detail = "backend switched protocols without completing the WebSocket handshake"
                raise DenyError(Reason.UPSTREAM_UNAVAILABLE, detail)
            response = web.Response(
                status=answer.status,
                body=answer.body,
                headers=filter_response_headers(answer.headers),
            )
            self.audit_allowed(ex, answer.status, "upgrade declined by the backend")
            return response
        switch = web.StreamResponse(status=101, headers=filter_response_headers(answer.headers))
        switch.headers["Upgrade"] = "websocket"
        switch.headers["Connection"] = "Upgrade"
        transport = request.transport
        try:
            if transport is None:
                raise DenyError(Reason.REQUEST_REJECTED, "client went away during the handshake")
            await switch.prepare(request)
        except BaseException:
            backend.close()
            raise
        assert ex.identity is not None
        tunnel = Tunnel(
            transport,
            backend,
            identity=ex.identity,
            path=path,
            tenant=ex.tenant,
            token_expiry=token_expiry(ex.identity),
        )
        await self._relay(request, ex, policy, tunnel)
        return switch

    async def _handshake_upstream(
        self, request: web.Request, ex: Exchange, policy: Policy, target: str
    ) -> tuple[Backend, BackendAnswer]:
        """A new backend connection, the handshake written on it and the backend's answer."""
        identity = ex.identity
        decision = ex.decision
        assert identity is not None
        assert decision is not None
        headers = self.upstream_headers(request, ex, policy.document.service, identity, decision)
        headers.append(("Connection", "Upgrade"))
        headers.append(("Upgrade", "websocket"))
        try:
            head = serialise_head("GET", target, headers)
        except UnsafeHeadError as exc:
            raise DenyError(Reason.INTERNAL_ERROR, f"unsafe upstream request head: {exc}") from None
        state = self.state
        settings = state.settings
        upstream = settings.upstream
        try:
            backend = await connect_backend(
                upstream.host, upstream.port, state.upstream_ssl, settings.connect_timeout
            )
            assert backend.transport is not None
            backend.transport.write(head)
            return backend, await backend.answer(settings.upstream_timeout)
        except UpstreamTimeoutError as exc:
            raise DenyError(Reason.UPSTREAM_TIMEOUT, str(exc)) from None
        except UpstreamUnavailableError as exc:
            raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc)) from None

    async def _relay(
        self, request: web.Request, ex: Exchange, policy: Policy, tunnel: Tunnel
    ) -> None:
        """Audit the open, relay until either side (or the policy) ends it, audit the close."""
        state = self.state
        decision = ex.decision
        assert decision is not None
        state.tunnels.add(tunnel, policy, ex.now)
        state.metrics.websocket_open.inc()
        self.audit_allowed(ex, 101, websocket={"event": "open"})
        try:
            request.protocol.set_parser(ClientSide(tunnel))  # type: ignore[arg-type]
            while await tunnel.wait():  # True: the caller's socket is full
                await request.writer.drain()
                tunnel.resume_backend()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            tunnel.end("client")  # no-op when it already ended
            state.tunnels.remove(tunnel)
            self._record_close(ex, tunnel, decision.grant)

    def _record_close(self, ex: Exchange, tunnel: Tunnel, grant: str | None) -> None:
        """The record of a WebSocket's end (duration, bytes each way, who ended it and why)
        and its metrics."""
        websocket = {
            "event": "close",
            "closed_by": tunnel.closed_by,
            "bytes_from_client": tunnel.bytes_from_client,
            "bytes_to_client": tunnel.bytes_to_client,
        }
        ex.now = self.state.clock()  # the record's time is the close; duration_ms the whole
        self.record(ex, "close", tunnel.reason, grant, 101, tunnel.detail, websocket)
        metrics = self.state.metrics
        metrics.websocket_open.dec()
        metrics.websocket_closed.labels(tunnel.closed_by, tunnel.reason.value).inc()
        metrics.websocket_bytes.labels("from_client").inc(tunnel.bytes_from_client)
        metrics.websocket_bytes.labels("to_client").inc(tunnel.bytes_to_client)

    def _respond_buffered(
        self, ex: Exchange, upstream: UpstreamResponse, body: bytes
    ) -> web.StreamResponse:
        """The response when the whole upstream body arrived with its head (no coroutine)."""
        headers = filter_response_headers(upstream.headers)  # the response copies the list
        response = web.Response(status=upstream.status, body=body, headers=headers)
        self.audit_allowed(ex, upstream.status)
        return response

    async def _respond(
        self, request: web.Request, ex: Exchange, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        """Stream the upstream body (or answer a HEAD request) to the caller."""
        headers = filter_response_headers(upstream.headers)  # the response copies the list
        length = content_length(upstream.headers)
        stream = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None:
            stream.content_length = length
        detail: str | None = None
        try:
            await stream.prepare(request)
            async for chunk in upstream.iter_chunks():
                await stream.write(chunk)
            await stream.write_eof()
        except (UpstreamUnavailableError, UpstreamTimeoutError) as exc:
            detail = f"upstream failed mid-body: {exc}"
            _abort(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            detail = f"client went away mid-body: {type(exc).__name__}"
        finally:
            upstream.close()
        self.audit_allowed(ex, upstream.status, detail)
        return stream

    # -- outcomes --------------------------------------------------------------------------

    def _deny(self, ex: Exchange, denied: DenyError) -> web.Response:
        reason = denied.reason
        status = denied.status
        grant = ex.decision.grant if ex.decision is not None else None
        self.record(ex, "deny", reason, grant, status, denied.detail)
        return _json_error(status, reason, ex.request_id, denied.extra_headers, denied.body)


PIPELINE: web.AppKey[ProxyHandler] = web.AppKey("nhigate_proxy_pipeline", ProxyHandler)
"""The pipeline `ProxyRunner` hands every request to."""


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def setup_pipeline(app: web.Application, pipeline: ProxyHandler) -> None:
    """Route every request, whatever its target or method, through `pipeline`.

    Installed as the only middleware with no routes, so requests the router cannot
    match (CONNECT authority-form, `OPTIONS *`) are still refused and audited by the
    pipeline instead of getting aiohttp's unaudited 404.
    """

    @web.middleware
    async def nhigate_pipeline(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],  # the router's: unused
    ) -> web.StreamResponse:
        return await pipeline.handle(request, answers_expect=False)

    app.middlewares.append(nhigate_pipeline)
