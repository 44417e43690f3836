"""The data-plane application: every request is authenticated, authorised, audited, forwarded.

The pipeline, in order (one function each, `ProxyHandler.handle` reads top to bottom):

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

import asyncio
import ipaddress
import itertools
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import HttpVersion11, web

from nhigate.policy import (
    Decision,
    Identity,
    PathRejected,
    Policy,
    Reason,
    normalise_path,
)
from nhigate.policy.decide import decide_request
from nhigate.policy.document import ServiceConfig, UpstreamCredential
from nhigate.policy.mcp import mcp_endpoint_of, mcp_scope
from nhigate.proxy.audit import AuditLog, audit_line
from nhigate.proxy.forward import (
    IDEMPOTENT_METHODS,
    RequestBody,
    UnsafeHeadError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    chunked,
    serialise_head,
)
from nhigate.proxy.headers import (
    IDENTITY_GRANT,
    IDENTITY_ISSUER,
    IDENTITY_SUBJECT,
    REQUEST_ID,
    filter_request_headers,
    filter_response_headers,
    safe_header_value,
)
from nhigate.proxy.mcp import (
    McpAuthorised,
    McpDeniedError,
    McpGate,
    McpUpstreamError,
)
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.overrides import (
    METHOD_OVERRIDE_HEADERS,
    PATH_OVERRIDE_HEADERS,
    BodyOverrideError,
    FormOverrideScanner,
    Overrides,
    canonical_header,
    check_form_body,
    find_overrides,
    form_kind,
)
from nhigate.proxy.policy_source import PolicyHolder
from nhigate.proxy.ratelimit import retry_after_header
from nhigate.proxy.settings import ProxySettings
from nhigate.proxy.state import (
    STATE,
    AssertionSigning,
    Authenticating,
    AuthnResult,
    Clock,
    ProxyState,
    UpstreamCredentialFile,
)
from nhigate.proxy.websocket import (
    RECHECK_INTERVAL,
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


BUFFERED_BODY_LIMIT = 64 * 1024
"""Request bodies up to this size (with a Content-Length) are read whole, so a stale pooled
upstream connection can be retried safely; larger ones are streamed."""

REJECTED_METHODS = frozenset({"CONNECT", "TRACE"})

STATUS_FOR: dict[Reason, int] = {
    Reason.REQUEST_REJECTED: 400,
    Reason.OVERRIDE_REJECTED: 400,
    Reason.UPGRADE_REJECTED: 400,
    Reason.PATH_REJECTED: 400,
    Reason.NO_POLICY: 503,
    Reason.CREDENTIAL_MISSING: 401,
    Reason.TOKEN_MALFORMED: 401,
    Reason.TOKEN_INVALID: 401,
    Reason.TOKEN_EXPIRED: 401,
    Reason.TOKEN_NOT_YET_VALID: 401,
    Reason.TOKEN_LIFETIME_EXCEEDED: 401,
    Reason.UNKNOWN_ISSUER: 401,
    Reason.UNKNOWN_KEY: 401,
    Reason.ALGORITHM_NOT_ALLOWED: 401,
    Reason.AUDIENCE_MISMATCH: 401,
    Reason.NO_MATCHING_GRANT: 403,
    Reason.GRANT_NOT_YET_VALID: 403,
    Reason.GRANT_EXPIRED: 403,
    Reason.TENANT_MISMATCH: 403,
    Reason.REVOKED: 403,
    Reason.IDENTITY_RETIRED: 401,
    Reason.DELEGATION_NOT_ALLOWED: 403,
    Reason.DELEGATION_TOO_DEEP: 403,
    Reason.ACTOR_NOT_ALLOWED: 403,
    Reason.ACTOR_REQUIRED: 403,
    Reason.MCP_METHOD_NOT_ALLOWED: 403,
    Reason.MCP_SESSION_MISMATCH: 403,
    Reason.MCP_REJECTED: 400,
    Reason.RATE_LIMITED: 429,
    Reason.REQUEST_TIMEOUT: 408,
    Reason.CONNECTION_LIMIT: 503,
    Reason.BODY_TOO_LARGE: 413,
    Reason.UPSTREAM_UNAVAILABLE: 502,
    Reason.UPSTREAM_TIMEOUT: 504,
    Reason.INTERNAL_ERROR: 500,
}


class DenyError(Exception):
    """A pipeline stage refused the request."""

    def __init__(
        self,
        reason: Reason,
        detail: str | None = None,
        *,
        extra_headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail
        self.extra_headers = extra_headers
        self.body = body
        """A JSON body to answer with instead of the default (a JSON-RPC error on MCP)."""


class BodyTooLargeError(Exception):
    """A streamed request body passed the configured maximum."""


@dataclass(slots=True)
class _Exchange:
    """What the audit line needs to know about one request, filled in as the pipeline runs."""

    request_id: str
    started: float
    now: float
    method: str
    path: str
    policy: Policy | None = None
    identity: Identity | None = None
    decision: Decision | None = None
    tenant: str | None = None
    mcp: dict[str, Any] | None = None
    """The MCP messages of the request (method and tool/resource/prompt), for the audit."""
    override: tuple[str | None, str | None] | None = None
    """The (method, path) an authorised override named, as forwarded; None: no override."""
    answers_expect: bool = True
    """Send `100 Continue` ourselves (False behind aiohttp's router, which already does)."""


def _json_error(
    reason: Reason, request_id: str, headers: dict[str, str] | None, body: bytes | None = None
) -> web.Response:
    status = STATUS_FOR.get(reason, 403)
    if body is None:
        body = orjson.dumps({"error": reason.value, "request_id": request_id})
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.headers[REQUEST_ID] = request_id
    if headers:
        resp.headers.update(headers)
    return resp


def _www_authenticate(reason: Reason) -> dict[str, str]:
    if reason is Reason.CREDENTIAL_MISSING:
        return {"WWW-Authenticate": 'Bearer realm="nhigate"'}
    value = f'Bearer realm="nhigate", error="invalid_token", error_description="{reason.value}"'
    return {"WWW-Authenticate": value}


def _authn_denial(failure: AuthnResult) -> DenyError:
    """An authentication failure as a 401 with its `WWW-Authenticate` challenge."""
    return DenyError(
        failure.reason, failure.detail, extra_headers=_www_authenticate(failure.reason)
    )


def _denial(policy: Policy, identity: Identity, decision: Decision) -> DenyError:
    """The refusal for a denying decision; a retired identity's token is no longer a valid
    credential (401, like the API server's own answer), with the reason in the audit detail."""
    if decision.reason is Reason.IDENTITY_RETIRED:
        challenge = _www_authenticate(decision.reason)
        return DenyError(decision.reason, policy.retirement(identity), extra_headers=challenge)
    return DenyError(decision.reason)


class ProxyHandler:
    """The catch-all request handler: the pipeline described in the module docstring."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        settings = state.settings
        self._upstream = settings.upstream
        self._upstream_url = settings.upstream.url
        self._authority = settings.upstream.authority
        self._trusted = settings.trusted_proxies
        self._max_body = settings.max_body_bytes
        self._mtls = settings.client_ca is not None
        self._scheme = "https" if settings.tls_cert is not None else "http"
        self._request_ids = request_id_source()
        self._owned: tuple[ServiceConfig | None, frozenset[str]] = (None, frozenset())
        self._last_identity_headers: tuple[
            Identity | None, Decision | None, list[tuple[str, str]]
        ] = (None, None, [])
        self._mcp = McpGate(self._max_body, state.mcp_sessions)

    async def handle(
        self, request: web.Request, *, answers_expect: bool = True
    ) -> web.StreamResponse:
        """Proxy `request`; `answers_expect=False` when aiohttp's router has already
        answered its `Expect: 100-continue` (`setup_pipeline`)."""
        state = self.state
        state.inflight += 1
        ex = _Exchange(
            request_id=self._request_ids(),
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

    async def _pipeline(self, request: web.Request, ex: _Exchange) -> web.StreamResponse:
        path, query, authorization = self._target(request, ex)
        policy = self._policy(ex)
        # One lookup: the cached answer, else the signature check. A present Authorization
        # header decides alone; without one, an mTLS client certificate's SPIFFE ID.
        authenticator = self.state.authenticator
        if authenticator is None:
            raise DenyError(Reason.INTERNAL_ERROR, "no authenticator")
        spiffe_id = self._spiffe_id(request) if self._mtls and authorization is None else None
        result = authenticator.authenticate_now(authorization, spiffe_id)
        if result is None:  # not in the verified-token cache: check the signature
            result = await authenticator.authenticate(authorization, spiffe_id)
        if not isinstance(result, Identity):
            raise _authn_denial(result)
        ex.identity = identity = result
        service = policy.document.service
        if service.tenant is not None:
            ex.tenant = self._tenant(request, service, identity)
        overrides = find_overrides(request.headers.items(), query)
        if overrides:
            ex.override = self._override(service, overrides)
        websocket_key: str | None = None
        if "Upgrade" in request.headers:
            websocket_key = self._upgrade(request, ex, service, path)
        if service.mcp_endpoints:
            endpoint = mcp_endpoint_of(service, path)
            if endpoint is not None:  # decided per JSON-RPC message, never by path rules
                if ex.override is not None:  # MCP rules cannot authorise another method/path
                    raise DenyError(Reason.OVERRIDE_REJECTED, "override on an MCP endpoint")
                return await self._mcp_exchange(request, ex, policy, identity, endpoint, query)
        decision = self._authorise(policy, ex, identity, path)
        if ex.override is not None:
            self._authorise_override(policy, ex, identity, path)
        if decision.rate_limit is not None or service.rate_limit is not None:
            self._rate_limit(service, identity, decision)
        if websocket_key is not None:
            return await self._websocket(request, ex, policy, path, query, websocket_key)
        return await self._forward(request, ex, policy, path, query)

    # -- stages ----------------------------------------------------------------------------

    def _target(self, request: web.Request, ex: _Exchange) -> tuple[str, str, str | None]:
        """The normalised path, the untouched query of an origin-form request target and the
        one `Authorization` header (None when absent)."""
        raw = request.raw_path
        ex.path = raw[:512]
        if request.method in REJECTED_METHODS:
            raise DenyError(Reason.REQUEST_REJECTED, f"method {request.method} is not proxied")
        if not raw.startswith("/") or "#" in raw:
            raise DenyError(Reason.REQUEST_REJECTED, "request target must be origin-form")
        headers = request.headers
        authorization = headers.getall("Authorization", ())
        if len(authorization) > 1:
            raise DenyError(Reason.REQUEST_REJECTED, "more than one Authorization header")
        if ex.answers_expect and "Expect" in headers and request.version >= HttpVersion11:
            expect = headers.getall("Expect")
            if len(expect) != 1 or expect[0].lower() != "100-continue":
                raise DenyError(Reason.REQUEST_REJECTED, "unsupported Expect header")
        raw_path, sep, query = raw.partition("?")
        try:
            path = normalise_path(raw_path)
        except PathRejected as exc:
            raise DenyError(Reason.PATH_REJECTED, exc.reason) from None
        ex.path = path
        return path, sep + query, authorization[0] if authorization else None

    def _policy(self, ex: _Exchange) -> Policy:
        policy = self.state.holder.current  # this request keeps this object even across a swap
        if policy is None:
            raise DenyError(Reason.NO_POLICY, "no valid policy loaded")
        ex.policy = policy
        return policy

    def _spiffe_id(self, request: web.Request) -> str | None:
        from nhigate.proxy.spiffe import spiffe_id_from_peer_cert

        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(ssl_object, ssl.SSLObject):
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return spiffe_id_from_peer_cert(der) if der else None

    def _tenant(
        self, request: web.Request, service: ServiceConfig, identity: Identity
    ) -> str | None:
        mapping = service.tenant
        if mapping is None:
            return None
        from_header: str | None = None
        if mapping.header:
            values = request.headers.getall(mapping.header, ())
            if len(values) > 1:
                raise DenyError(Reason.TENANT_MISMATCH, "more than one tenant header")
            from_header = values[0] if values else None
        from_claim: str | None = None
        if mapping.claim:
            claim = identity.claims.get(mapping.claim)
            from_claim = claim if isinstance(claim, str) else None
        if mapping.header and mapping.claim:
            if from_header is not None and from_claim is not None and from_header != from_claim:
                raise DenyError(Reason.TENANT_MISMATCH, "tenant header and claim disagree")
            # Both configured: a tenant counts only when both sources name it.
            return from_claim if from_header == from_claim else None
        return from_header if mapping.header else from_claim

    def _authorise(self, policy: Policy, ex: _Exchange, identity: Identity, path: str) -> Decision:
        decision = decide_request(policy, identity, ex.method, path, ex.now, ex.tenant)
        ex.decision = decision
        if not decision.allowed:
            raise _denial(policy, identity, decision)
        return decision

    async def _mcp_exchange(
        self,
        request: web.Request,
        ex: _Exchange,
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
            self._rate_limit(service, identity, authorised.decision)
        return await self._forward(request, ex, policy, ex.path, "", mcp=authorised)

    def _override(
        self, service: ServiceConfig, overrides: Overrides
    ) -> tuple[str | None, str | None]:
        """Refuse a method or path override the service does not declare; otherwise the one
        method and the one canonical path it names (both are authorised, and forwarded)."""
        method: str | None = None
        target: str | None = None
        if overrides.methods:
            if not service.authorise_method_overrides:
                raise DenyError(
                    Reason.OVERRIDE_REJECTED, f"method override: {overrides.describe()}"
                )
            values = {value.strip().upper() for _, value in overrides.methods}
            if len(values) != 1:
                raise DenyError(Reason.OVERRIDE_REJECTED, "method overrides disagree")
            method = values.pop()
            if not _METHOD_TOKEN.fullmatch(method) or method in REJECTED_METHODS:
                raise DenyError(Reason.OVERRIDE_REJECTED, "method override is not a method")
        if overrides.paths:
            if not service.authorise_path_overrides:
                detail = f"path override: {overrides.describe()}"
                raise DenyError(Reason.OVERRIDE_REJECTED, detail)
            values = {value.strip() for _, value in overrides.paths}
            if len(values) != 1:
                raise DenyError(Reason.OVERRIDE_REJECTED, "path overrides disagree")
            raw_path, sep, override_query = values.pop().partition("?")
            if not raw_path.startswith("/") or "#" in raw_path:
                raise DenyError(Reason.OVERRIDE_REJECTED, "path override must be an origin path")
            try:
                target = normalise_path(raw_path) + sep + override_query
            except PathRejected as exc:
                raise DenyError(Reason.OVERRIDE_REJECTED, f"path override: {exc.reason}") from None
        return method, target

    def _authorise_override(
        self, policy: Policy, ex: _Exchange, identity: Identity, path: str
    ) -> None:
        """The backend may act on the override or on the request line: both must be granted."""
        assert ex.override is not None
        method, target = ex.override
        override_method = method or ex.method
        override_path = target.partition("?")[0] if target is not None else path
        service = policy.document.service
        if service.mcp_endpoints and mcp_endpoint_of(service, override_path) is not None:
            # A path rule must not reach an MCP endpoint through the backend's override.
            raise DenyError(Reason.OVERRIDE_REJECTED, "path override names an MCP endpoint")
        decision = decide_request(
            policy, identity, override_method, override_path, ex.now, ex.tenant
        )
        if not decision.allowed:
            detail = f"override {override_method} {override_path[:200]} not granted"
            raise DenyError(decision.reason, detail)

    def _upgrade(
        self, request: web.Request, ex: _Exchange, service: ServiceConfig, path: str
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

    def _rate_limit(self, service: ServiceConfig, identity: Identity, decision: Decision) -> None:
        limit = decision.rate_limit or service.rate_limit
        if limit is None:
            return
        key = (identity.kind, identity.issuer, identity.subject, decision.grant)
        wait = self.state.limiter.acquire(key, limit, asyncio.get_running_loop().time())
        if wait > 0.0:
            self.state.metrics.rate_limited.inc()
            raise DenyError(
                Reason.RATE_LIMITED, extra_headers={"Retry-After": retry_after_header(wait)}
            )

    async def _forward(
        self,
        request: web.Request,
        ex: _Exchange,
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
        headers = self._upstream_headers(request, ex, policy.document.service, identity, decision)
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
                    _check_form(body, form)
            else:
                body = _limited(request, self._max_body, form)
        elif length is None and request.body_exists:
            headers.append(("Transfer-Encoding", "chunked"))
            form = form_kind(request.headers.get("Content-Type", ""))
            body = chunked(_limited(request, self._max_body, form))
        elif request.method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", "0"))
        try:
            head = serialise_head(ex.method, path + query, headers)
        except UnsafeHeadError as exc:  # a proxy-made header broke framing: never send it
            raise DenyError(Reason.INTERNAL_ERROR, f"unsafe upstream request head: {exc}") from None
        sent = time.perf_counter()
        try:
            upstream = await pool.request(
                head, body, is_head=ex.method == "HEAD", idempotent=ex.method in IDEMPOTENT_METHODS
            )
        except UpstreamTimeoutError as exc:
            raise DenyError(Reason.UPSTREAM_TIMEOUT, str(exc)) from None
        except UpstreamUnavailableError as exc:
            raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc)) from None
        except BodyTooLargeError:
            raise DenyError(Reason.BODY_TOO_LARGE, f"body over {self._max_body} bytes") from None
        except BodyOverrideError as exc:  # found mid-stream: the upstream got no complete request
            raise DenyError(Reason.OVERRIDE_REJECTED, f"method override: {exc.where}") from None
        except (aiohttp.ClientPayloadError, ConnectionError) as exc:
            raise DenyError(
                Reason.REQUEST_REJECTED, f"reading the request body failed: {exc}"
            ) from None
        state.metrics.upstream_duration.observe(time.perf_counter() - sent)
        if mcp is not None:
            try:
                return await mcp.responder.respond(
                    request,
                    upstream,
                    lambda status, detail: self._audit_allowed(ex, status, detail),
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
        ex: _Exchange,
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
            self._audit_allowed(ex, answer.status, "upgrade declined by the backend")
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
        self, request: web.Request, ex: _Exchange, policy: Policy, target: str
    ) -> tuple[Backend, BackendAnswer]:
        """A new backend connection, the handshake written on it and the backend's answer."""
        identity = ex.identity
        decision = ex.decision
        assert identity is not None
        assert decision is not None
        headers = self._upstream_headers(request, ex, policy.document.service, identity, decision)
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
        self, request: web.Request, ex: _Exchange, policy: Policy, tunnel: Tunnel
    ) -> None:
        """Audit the open, relay until either side (or the policy) ends it, audit the close."""
        state = self.state
        decision = ex.decision
        assert decision is not None
        state.tunnels.add(tunnel, policy, ex.now)
        state.metrics.websocket_open.inc()
        self._audit_allowed(ex, 101, websocket={"event": "open"})
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

    def _record_close(self, ex: _Exchange, tunnel: Tunnel, grant: str | None) -> None:
        """The record of a WebSocket's end (duration, bytes each way, who ended it and why)
        and its metrics."""
        websocket = {
            "event": "close",
            "closed_by": tunnel.closed_by,
            "bytes_from_client": tunnel.bytes_from_client,
            "bytes_to_client": tunnel.bytes_to_client,
        }
        ex.now = self.state.clock()  # the record's time is the close; duration_ms the whole
        self._record(ex, "close", tunnel.reason, grant, 101, tunnel.detail, websocket)
        metrics = self.state.metrics
        metrics.websocket_open.dec()
        metrics.websocket_closed.labels(tunnel.closed_by, tunnel.reason.value).inc()
        metrics.websocket_bytes.labels("from_client").inc(tunnel.bytes_from_client)
        metrics.websocket_bytes.labels("to_client").inc(tunnel.bytes_to_client)

    def _upstream_headers(
        self,
        request: web.Request,
        ex: _Exchange,
        service: ServiceConfig,
        identity: Identity,
        decision: Decision,
    ) -> list[tuple[str, str]]:
        assertion = service.identity_assertion
        credential = service.upstream_credential
        peer = request.remote or ""
        trusted = bool(self._trusted) and self._is_trusted(peer)
        headers = filter_request_headers(
            request.headers.items(), owned=self._owned_headers(service), trusted_peer=trusted
        )
        if ex.override is not None:
            headers = _canonical_overrides(headers, ex.override)
        forwarded_for = peer
        proto = self._scheme
        host = request.headers.get("Host", "")
        if trusted:
            kept: list[tuple[str, str]] = []
            for name, value in headers:
                lower = name.lower()
                if lower == "x-forwarded-for":
                    forwarded_for = f"{value}, {peer}"
                elif lower == "x-forwarded-proto":
                    proto = value
                elif lower == "x-forwarded-host":
                    host = value
                else:
                    kept.append((name, value))
            headers = kept
        headers.append(("Host", self._authority))
        headers.append(("X-Forwarded-For", forwarded_for))
        headers.append(("X-Forwarded-Proto", proto))
        if host:
            headers.append(("X-Forwarded-Host", host))
        headers.append((REQUEST_ID, ex.request_id))
        headers.extend(self._identity_headers(identity, decision))
        signer = self.state.signer
        if assertion is not None and signer is not None:
            token = signer.sign(
                identity, decision.grant, assertion.audience, assertion.ttl_seconds, ex.now
            )
            headers.append((assertion.header, token))
        if credential is not None:
            headers.append((credential.header, self._credential_value(credential)))
        return headers

    def _identity_headers(self, identity: Identity, decision: Decision) -> list[tuple[str, str]]:
        """`X-Nhigate-Subject/Issuer/Grant`, remembered for the last (identity, decision):
        both are shared immutable objects while a token stays cached."""
        last_identity, last_decision, cached = self._last_identity_headers
        if last_identity is identity and last_decision is decision:
            return cached
        values = [
            (IDENTITY_SUBJECT, safe_header_value(identity.subject)),
            (IDENTITY_ISSUER, safe_header_value(identity.issuer)),
        ]
        if decision.grant is not None:
            values.append((IDENTITY_GRANT, safe_header_value(decision.grant)))
        self._last_identity_headers = (identity, decision, values)
        return values

    def _owned_headers(self, service: ServiceConfig) -> frozenset[str]:
        """Lower-case names of the headers the proxy sets for `service` (cached per policy)."""
        cached_for, owned = self._owned
        if cached_for is service:
            return owned
        names = set(self.state.settings.extra_owned_headers)
        if service.identity_assertion is not None:
            names.add(service.identity_assertion.header.lower())
        if service.upstream_credential is not None:
            names.add(service.upstream_credential.header.lower())
        owned = frozenset(names)
        self._owned = (service, owned)
        return owned

    def _credential_value(self, spec: UpstreamCredential) -> str:
        current = self.state.credential
        if current is None or current.spec != spec:
            current = UpstreamCredentialFile(spec, asyncio.get_running_loop().time)
            self.state.credential = current
        try:
            return current.header_value()
        except OSError as exc:
            detail = f"upstream credential unreadable: {exc}"
            raise DenyError(Reason.INTERNAL_ERROR, detail) from None

    def _is_trusted(self, peer: str | None) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def _respond_buffered(
        self, ex: _Exchange, upstream: UpstreamResponse, body: bytes
    ) -> web.StreamResponse:
        """The response when the whole upstream body arrived with its head (no coroutine)."""
        headers = filter_response_headers(upstream.headers)  # the response copies the list
        response = web.Response(status=upstream.status, body=body, headers=headers)
        self._audit_allowed(ex, upstream.status)
        return response

    async def _respond(
        self, request: web.Request, ex: _Exchange, upstream: UpstreamResponse
    ) -> web.StreamResponse:
        """Stream the upstream body (or answer a HEAD request) to the caller."""
        headers = filter_response_headers(upstream.headers)  # the response copies the list
        length = _content_length(upstream.headers)
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
        self._audit_allowed(ex, upstream.status, detail)
        return stream

    # -- outcomes --------------------------------------------------------------------------

    def _audit_allowed(
        self,
        ex: _Exchange,
        status: int,
        detail: str | None = None,
        websocket: dict[str, Any] | None = None,
    ) -> None:
        decision = ex.decision
        assert decision is not None
        self._record(ex, "allow", Reason.ALLOWED, decision.grant, status, detail, websocket)
        if decision.grant is not None and ex.policy is not None:
            self.state.usage.record(ex.policy, decision.grant, ex.method, ex.path, ex.now)

    def _deny(self, ex: _Exchange, denied: DenyError) -> web.Response:
        reason = denied.reason
        status = STATUS_FOR.get(reason, 403)
        grant = ex.decision.grant if ex.decision is not None else None
        self._record(ex, "deny", reason, grant, status, denied.detail)
        return _json_error(reason, ex.request_id, denied.extra_headers, denied.body)

    def _record(
        self,
        ex: _Exchange,
        decision: str,
        reason: Reason,
        grant: str | None,
        status: int,
        detail: str | None,
        websocket: dict[str, Any] | None = None,
    ) -> None:
        elapsed = time.perf_counter() - ex.started
        state = self.state
        policy = ex.policy
        state.audit.write_line(
            audit_line(
                ex.now,
                ex.request_id,
                decision,
                reason.value,
                ex.method,
                ex.path,
                self._upstream_url,
                status,
                elapsed * 1000.0,
                policy.version if policy is not None else None,
                ex.identity,
                grant,
                detail,
                ex.tenant,
                mcp=ex.mcp,
                websocket=websocket,
            )
        )
        if decision != "close":  # the connection was counted when it opened
            state.metrics.observe_request(decision, reason.value, grant, elapsed)


PIPELINE: web.AppKey[ProxyHandler] = web.AppKey("nhigate_proxy_pipeline", ProxyHandler)
"""The pipeline `ProxyRunner` hands every request to."""


def request_id_source() -> Callable[[], str]:
    """Request ids: 16 hex digits, a random per-process prefix and a counter.

    Unique within a process and, with 32 random bits per process, across replicas in
    practice; one `os.urandom` per process instead of one per request. Request ids
    correlate logs, they are not secrets.
    """
    prefix = secrets.token_hex(4)
    counter = itertools.count(secrets.randbelow(1 << 32))
    return lambda: f"{prefix}{next(counter) & 0xFFFFFFFF:08x}"


def _canonical_overrides(
    headers: list[tuple[str, str]], override: tuple[str | None, str | None]
) -> list[tuple[str, str]]:
    """Forward authorised override headers with exactly the values that were authorised."""
    method, target = override
    out: list[tuple[str, str]] = []
    for name, value in headers:
        canonical = canonical_header(name)
        if method is not None and canonical in METHOD_OVERRIDE_HEADERS:
            value = method
        elif target is not None and canonical in PATH_OVERRIDE_HEADERS:
            value = target
        out.append((name, value))
    return out


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _limited(
    request: web.Request, limit: int, form: str | None = None
) -> AsyncIterator[bytes]:
    """The request body, streamed; a form body is scanned for a method override on the way."""
    total = 0
    content = request.content
    scanner = FormOverrideScanner(form) if form is not None else None
    while True:
        chunk = await content.readany()
        if not chunk:
            if scanner is not None:
                scanner.finish()
            return
        total += len(chunk)
        if total > limit:
            raise BodyTooLargeError
        if scanner is not None:
            scanner.feed(chunk)  # raises before the chunk naming an override is forwarded
        yield chunk


def _check_form(body: bytes, form: str) -> None:
    try:
        check_form_body(body, form)
    except BodyOverrideError as exc:
        raise DenyError(Reason.OVERRIDE_REJECTED, f"method override: {exc.where}") from None


_METHOD_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")


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
    setup_pipeline(app, pipeline)
    return app


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
