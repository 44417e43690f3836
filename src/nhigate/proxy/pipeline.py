"""The front-end-neutral request pipeline: the stages every request passes, HTTP/1.1 or 2.

`app.ProxyHandler` (HTTP/1.1, aiohttp) and `http2.Http2Gateway` (HTTP/2 streams) both run
these stages, in the order app.py's module docstring gives, on a `RequestView`: what a stage
reads of a request (method, raw target, headers, peer, transport). aiohttp's `web.Request`
is one as it is; an HTTP/2 stream builds one from its header block. Each stage raises
`DenyError` to refuse; `Pipeline.record` writes the one audit line of every outcome.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import HttpVersion, HttpVersion11
from multidict import MultiMapping

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
from nhigate.policy.mcp import mcp_endpoint_of
from nhigate.proxy.audit import audit_line
from nhigate.proxy.headers import (
    IDENTITY_GRANT,
    IDENTITY_ISSUER,
    IDENTITY_SUBJECT,
    REQUEST_ID,
    filter_request_headers,
    safe_header_value,
)
from nhigate.proxy.overrides import (
    METHOD_OVERRIDE_HEADERS,
    PATH_OVERRIDE_HEADERS,
    Overrides,
    canonical_header,
    find_overrides,
)
from nhigate.proxy.ratelimit import retry_after_header
from nhigate.proxy.state import AuthnResult, ProxyState, UpstreamCredentialFile


class RequestView(Protocol):
    """What the stages read of a request; `aiohttp.web.Request` is one as it is."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str:
        """The request target as received (path and query, not decoded)."""

    @property
    def version(self) -> HttpVersion: ...

    @property
    def headers(self) -> MultiMapping[str]:
        """Case-insensitive; HTTP/2's `:authority` appears as `Host`."""

    @property
    def remote(self) -> str | None:
        """The peer's address."""

    @property
    def transport(self) -> asyncio.Transport | None: ...


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
        status: int | None = None,
    ) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail
        self.extra_headers = extra_headers
        self.body = body
        """A JSON body to answer with instead of the default (a JSON-RPC error on MCP)."""
        self.status = status if status is not None else STATUS_FOR.get(reason, 403)
        """The HTTP status: the reason's, unless a front end refuses with a more specific
        one under the same reason (505, 431 on HTTP/2)."""


@dataclass(slots=True)
class Exchange:
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
    grpc: tuple[str, str] | None = None
    """The gRPC (service, method) the request calls, for the audit; None: not gRPC."""
    grpc_status: int | None = None
    """The `grpc-status` the caller was given, when the proxy knows it."""
    status: int = 0
    """The upstream's response status once it answered (HTTP/2: for a stream reset later)."""
    audited: bool = False
    """The outcome's audit line is written (HTTP/2: a reset after it writes none)."""
    answers_expect: bool = True
    """Send `100 Continue` ourselves (False behind aiohttp's router, which already does)."""


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


class Pipeline:
    """The stages, with the per-process caches they share (one per application)."""

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
        self.request_ids = request_id_source()
        self._owned: tuple[ServiceConfig | None, frozenset[str]] = (None, frozenset())
        self._last_identity_headers: tuple[
            Identity | None, Decision | None, list[tuple[str, str]]
        ] = (None, None, [])

    def target(self, request: RequestView, ex: Exchange) -> tuple[str, str, str | None]:
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

    def current_policy(self, ex: Exchange) -> Policy:
        policy = self.state.holder.current  # this request keeps this object even across a swap
        if policy is None:
            raise DenyError(Reason.NO_POLICY, "no valid policy loaded")
        ex.policy = policy
        return policy

    def authenticate_now(self, request: RequestView, authorization: str | None) -> Identity | None:
        """The caller's identity when no signature must be checked (a cached token); None:
        `await authenticate()` instead. A present Authorization header decides alone;
        without one, an mTLS client certificate's SPIFFE ID. No coroutine on the common
        path: a cache hit costs no task switch."""
        authenticator = self.state.authenticator
        if authenticator is None:
            raise DenyError(Reason.INTERNAL_ERROR, "no authenticator")
        spiffe_id = self.spiffe_id(request) if self._mtls and authorization is None else None
        result = authenticator.authenticate_now(authorization, spiffe_id)
        if result is None:
            return None
        if not isinstance(result, Identity):
            raise _authn_denial(result)
        return result

    async def authenticate(self, request: RequestView, authorization: str | None) -> Identity:
        """The caller's identity after the signature check (`authenticate_now` said None)."""
        spiffe_id = self.spiffe_id(request) if self._mtls and authorization is None else None
        authenticator = self.state.authenticator
        if authenticator is None:
            raise DenyError(Reason.INTERNAL_ERROR, "no authenticator")
        result = await authenticator.authenticate(authorization, spiffe_id)
        if not isinstance(result, Identity):
            raise _authn_denial(result)
        return result

    def spiffe_id(self, request: RequestView) -> str | None:
        from nhigate.proxy.spiffe import spiffe_id_from_peer_cert

        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(ssl_object, ssl.SSLObject):
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return spiffe_id_from_peer_cert(der) if der else None

    def tenant(
        self, request: RequestView, service: ServiceConfig, identity: Identity
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

    def authorise(self, policy: Policy, ex: Exchange, identity: Identity, path: str) -> Decision:
        decision = decide_request(policy, identity, ex.method, path, ex.now, ex.tenant)
        ex.decision = decision
        if not decision.allowed:
            raise _denial(policy, identity, decision)
        return decision

    def override(
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

    def authorise_override(
        self, policy: Policy, ex: Exchange, identity: Identity, path: str
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

    async def identify(
        self, request: RequestView, ex: Exchange, query: str, authorization: str | None
    ) -> tuple[Policy, Identity]:
        """The stages every front end runs after `target`: the policy in force, the caller's
        identity, its tenant and any override headers (judged, not yet authorised)."""
        found = self.identify_now(request, ex, query, authorization)
        if found is None:
            found = await self.identify_checked(request, ex, query, authorization)
        return found

    async def identify_checked(
        self, request: RequestView, ex: Exchange, query: str, authorization: str | None
    ) -> tuple[Policy, Identity]:
        """`identify` once `identify_now` said None: the signature check, then the rest."""
        policy = ex.policy
        assert policy is not None  # identify_now set it before it asked for the check
        ex.identity = identity = await self.authenticate(request, authorization)
        self._qualify(request, ex, policy, identity, query)
        return policy, identity

    def identify_now(
        self, request: RequestView, ex: Exchange, query: str, authorization: str | None
    ) -> tuple[Policy, Identity] | None:
        """`identify` without a coroutine when no signature must be checked (a cached token);
        None: `await identify_checked()` (which checks it)."""
        policy = self.current_policy(ex)
        identity = self.authenticate_now(request, authorization)
        if identity is None:
            return None
        ex.identity = identity
        self._qualify(request, ex, policy, identity, query)
        return policy, identity

    def _qualify(
        self, request: RequestView, ex: Exchange, policy: Policy, identity: Identity, query: str
    ) -> None:
        """The identity's tenant and the request's override headers (judged, not authorised)."""
        service = policy.document.service
        if service.tenant is not None:
            ex.tenant = self.tenant(request, service, identity)
        overrides = find_overrides(request.headers.items(), query)
        if overrides:
            ex.override = self.override(service, overrides)

    def admit(self, policy: Policy, ex: Exchange, identity: Identity, path: str) -> Decision:
        """Authorise the request (and its override), then charge its rate limit."""
        decision = self.authorise(policy, ex, identity, path)
        if ex.override is not None:
            self.authorise_override(policy, ex, identity, path)
        service = policy.document.service
        if decision.rate_limit is not None or service.rate_limit is not None:
            self.rate_limit(service, identity, decision)
        return decision

    def rate_limit(self, service: ServiceConfig, identity: Identity, decision: Decision) -> None:
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

    def upstream_headers(
        self,
        request: RequestView,
        ex: Exchange,
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

    def audit_allowed(
        self,
        ex: Exchange,
        status: int,
        detail: str | None = None,
        websocket: dict[str, Any] | None = None,
    ) -> None:
        decision = ex.decision
        assert decision is not None
        self.record(ex, "allow", Reason.ALLOWED, decision.grant, status, detail, websocket)
        if decision.grant is not None and ex.policy is not None:
            self.state.usage.record(ex.policy, decision.grant, ex.method, ex.path, ex.now)

    def record(
        self,
        ex: Exchange,
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
                grpc=ex.grpc,
                grpc_status=ex.grpc_status,
            )
        )
        if decision != "close":  # the connection was counted when it opened
            state.metrics.observe_request(decision, reason.value, grant, elapsed)


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


_METHOD_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")
