"""Client connections on the proxied port: a request-head timeout, an idle timeout, a bound.

aiohttp alone keeps a connection that never sends a byte, or that trickles a request head a
byte every few seconds, for its keep-alive timeout (an hour by default): each one holds a
file descriptor and memory until enough of them take the replica down. Here:

- **Request head** (`request_head_timeout`, nginx's `client_header_timeout`): the whole head
  must arrive within N seconds, counted from accepting the connection (first request) or
  from the first byte of a later request, *not* reset by each byte that arrives. A partial
  head then gets `408` and the connection is closed; a connection that sent nothing is just
  closed. Both are audited as `request_timeout`.
- **Idle** (`idle_timeout`, nginx's `keepalive_timeout`): a kept-alive connection with no
  request for N seconds is closed (counted, not audited: it is how every healthy keep-alive
  connection ends).
- **Bound** (`max_connections`): at the bound a new connection gets a canned `503` and is
  closed at once, without a parser or a task; audited as `connection_limit` and counted.

Once a head is complete nothing here applies: a slow request or response body is the
request's business (its own limits are the body size and the upstream timeout).

There is no timer per request: each connection has one deadline, kept in aiohttp's own
keep-alive timer slot. aiohttp already moves that deadline after every response (to the
idle timeout); the head timeout sets it at accept and, between requests, at the first byte
of the next head. When it fires, the connection is closed only if it is still waiting for a
complete head; whether a partial head was received decides 408 versus a silent close.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web

from nhigate.policy import Reason
from nhigate.proxy.aiohttp_seam import HeadDeadlineConnection, RebuiltServer
from nhigate.proxy.audit import AuditEvent, AuditLog
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import PolicyHolder

_PHRASES = {408: "Request Timeout", 503: "Service Unavailable"}


def canned_response(status: int, reason: Reason, request_id: str) -> bytes:
    """A complete `Connection: close` response, as the pipeline's deny bodies look."""
    body = orjson.dumps({"error": reason.value, "request_id": request_id})
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-Id: {request_id}\r\n"
        f"{retry}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _peer_host(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


@dataclass(frozen=True, slots=True)
class ConnectionAudit:
    """Writes the audit record and metrics of each connection-level decision."""

    audit: AuditLog
    metrics: ProxyMetrics
    holder: PolicyHolder
    clock: Callable[[], float]
    upstream: str

    def _write(
        self, reason: Reason, status: int, request_id: str, peer: str | None, **kw: Any
    ) -> None:
        policy = self.holder.current
        self.audit.write(
            AuditEvent(
                time=self.clock(),
                request_id=request_id,
                decision="deny",
                reason=reason.value,
                method="-",
                path="",
                upstream=self.upstream,
                status=status,
                policy_version=policy.version if policy is not None else None,
                peer=peer,
                **kw,
            )
        )

    def head_timeout(
        self, request_id: str, peer: str | None, *, partial: bool, timeout: float, waited: float
    ) -> None:
        """A request head did not arrive in time: 408 if `partial`, else closed silently."""
        self.metrics.client_timeouts.labels("head").inc()
        if partial:
            detail = f"request head incomplete after {timeout:g} s: answered 408"
        else:
            detail = f"no request byte within {timeout:g} s: closed without an answer"
        status = 408 if partial else 0
        self._write(
            Reason.REQUEST_TIMEOUT,
            status,
            request_id,
            peer,
            duration_ms=waited * 1000.0,
            detail=detail,
        )

    def idle_timeout(self) -> None:
        """A kept-alive connection was idle too long and was closed."""
        self.metrics.client_timeouts.labels("idle").inc()

    def refused(self, request_id: str, peer: str | None, bound: int) -> None:
        """A connection over the bound was refused with 503."""
        self.metrics.connections_refused.inc()
        self._write(
            Reason.CONNECTION_LIMIT,
            503,
            request_id,
            peer,
            duration_ms=0.0,
            detail=f"{bound} connections already open (--max-connections): refused",
        )


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The proxied port's client-connection limits (from `ProxySettings`)."""

    request_head_timeout: float
    idle_timeout: float
    max_connections: int


class GuardedConnection(HeadDeadlineConnection):
    """aiohttp's HTTP/1.1 connection with the request-head deadline, audited."""

    __slots__ = ("_audit",)

    def __init__(
        self, manager: web.Server, *, head_timeout: float, audit: ConnectionAudit, **kw: Any
    ) -> None:
        super().__init__(manager, head_timeout=head_timeout, **kw)
        self._audit = audit

    def deadline_passed(self, *, partial: bool, first: bool, waited: float) -> None:
        transport = self.transport
        assert transport is not None  # the seam checks before calling
        if partial or first:
            request_id = secrets.token_hex(8)
            if partial:
                transport.write(canned_response(408, Reason.REQUEST_TIMEOUT, request_id))
            self._audit.head_timeout(
                request_id,
                _peer_host(transport),
                partial=partial,
                timeout=self._head_timeout,
                waited=waited,
            )
        else:
            self._audit.idle_timeout()


class RefusedConnection(asyncio.Protocol):
    """A connection over the bound: a canned 503, closed at once, audited."""

    __slots__ = ("_audit", "_bound")

    def __init__(self, audit: ConnectionAudit, bound: int) -> None:
        self._audit = audit
        self._bound = bound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        request_id = secrets.token_hex(8)
        peer = _peer_host(transport)
        stream = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's classes
        stream.write(canned_response(503, Reason.CONNECTION_LIMIT, request_id))
        stream.close()
        self._audit.refused(request_id, peer, self._bound)


class GuardedServer(RebuiltServer):
    """aiohttp's low-level server building `GuardedConnection`s, refusing over the bound."""

    def __init__(self, server: web.Server, limits: ConnectionLimits, audit: ConnectionAudit):
        super().__init__(server, keepalive_timeout=limits.idle_timeout)
        self._limits = limits
        self._audit = audit
        audit.metrics.connections_open.set_function(self.connection_count)

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        # The asyncio protocol factory. Over the bound it builds a `RefusedConnection`, which
        # is deliberately no HTTP connection (no parser, no task, nothing registered).
        if self.connection_count() >= self._limits.max_connections:
            return RefusedConnection(self._audit, self._limits.max_connections)
        return GuardedConnection(
            self,
            loop=self.event_loop(),
            head_timeout=self._limits.request_head_timeout,
            audit=self._audit,
            **self.connection_options(),
        )
