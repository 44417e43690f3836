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
import re
import secrets
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
from aiohttp import web

from nhigate.policy import Reason
from nhigate.proxy.aiohttp_seam import HeadDeadlineConnection, RebuiltServer
from nhigate.proxy.audit import AuditEvent, AuditLog
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import PolicyHolder

_PHRASES = {408: "Request Timeout", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The HTTP/2 client connection preface (RFC 9113 section 3.4): h2c prior knowledge, and
what an `h2` client sends first after ALPN."""


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
        self,
        reason: Reason,
        status: int,
        request_id: str,
        peer: str | None,
        method: str = "-",
        **kw: Any,
    ) -> None:
        policy = self.holder.current
        self.audit.write(
            AuditEvent(
                time=self.clock(),
                request_id=request_id,
                decision="deny",
                reason=reason.value,
                method=method,
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

    def protocol_refusal(
        self,
        reason: Reason,
        request_id: str,
        peer: str | None,
        detail: str,
        waited: float = 0.0,
        *,
        status: int = 0,
        method: str = "-",
    ) -> None:
        """A connection refused at the protocol level (HTTP/2 GOAWAY, or a 505 for HTTP/1.1
        on an HTTP/2 port); `status` 0: no HTTP response was possible."""
        self._write(
            reason, status, request_id, peer, method, duration_ms=waited * 1000.0, detail=detail
        )
        self.metrics.observe_request("deny", reason.value, None, waited)

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


class Http2Front(Protocol):
    """The HTTP/2 side of the proxied port (`http2.Http2Gateway`)."""

    @property
    def connections(self) -> Sized:
        """The HTTP/2 connections open now."""

    def connection(self, limits: ConnectionLimits, audit: ConnectionAudit) -> asyncio.Protocol:
        """The protocol of a connection that sent the HTTP/2 preface."""

    def refused(self, audit: ConnectionAudit, bound: int) -> asyncio.Protocol:
        """The protocol of a connection over the bound (GOAWAY, closed, audited)."""

    async def shutdown(self, grace: float) -> None:
        """GOAWAY everywhere; streams get `grace` seconds."""


_METHOD = re.compile(rb"[A-Z]{1,16}(?= )")


class ProtocolDispatch(asyncio.Protocol):
    """The first bytes of a connection on an HTTP/2 port decide who gets the transport.

    The HTTP/2 preface hands the transport (plain or TLS alike) to the HTTP/2 protocol with
    the bytes received so far. Anything else is HTTP/1.x (or noise): a canned `505`,
    audited, closed; aiohttp never parses it, so `Upgrade: h2c` cannot switch anything.
    The preface must arrive within the request-head timeout.
    """

    def __init__(
        self,
        front: Http2Front,
        limits: ConnectionLimits,
        audit: ConnectionAudit,
        on_done: Callable[[ProtocolDispatch], None],
    ) -> None:
        self._front = front
        self._limits = limits
        self._audit = audit
        self._on_done = on_done
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        self._timer = loop.call_later(self._limits.request_head_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        buffer = self._buffer + data
        if len(buffer) < len(HTTP2_PREFACE) and HTTP2_PREFACE.startswith(buffer):
            self._buffer = buffer
            return
        self._finish()
        if buffer.startswith(HTTP2_PREFACE):
            protocol = self._front.connection(self._limits, self._audit)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            protocol.data_received(buffer)
            return
        request_id = secrets.token_hex(8)
        transport.write(canned_response(505, Reason.REQUEST_REJECTED, request_id))
        transport.close()
        method = _METHOD.match(buffer)
        self._audit.protocol_refusal(
            Reason.REQUEST_REJECTED,
            request_id,
            _peer_host(transport),
            "not HTTP/2 on an HTTP/2 service (no HTTP/1.1, no h2c upgrade): answered 505",
            status=505,
            method=method.group().decode("ascii") if method else "-",
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def _finish(self) -> None:
        """This dispatcher is done (handed over, refused or lost): once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport = None
            self._on_done(self)

    def _timed_out(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        waited = asyncio.get_running_loop().time() - self._started
        timeout = self._limits.request_head_timeout
        what = "part of the HTTP/2 preface" if self._buffer else "no byte"
        self._audit.metrics.client_timeouts.labels("head").inc()
        self._audit.protocol_refusal(
            Reason.REQUEST_TIMEOUT,
            secrets.token_hex(8),
            _peer_host(transport),
            f"{what} within {timeout:g} s: closed without an answer",
            waited,
        )
        self._finish()
        transport.close()


class GuardedServer(RebuiltServer):
    """aiohttp's low-level server building `GuardedConnection`s, refusing over the bound;
    with an `http2` front, every connection is dispatched to HTTP/2 instead."""

    def __init__(
        self,
        server: web.Server,
        limits: ConnectionLimits,
        audit: ConnectionAudit,
        http2: Http2Front | None = None,
    ):
        super().__init__(server, keepalive_timeout=limits.idle_timeout)
        self._limits = limits
        self._audit = audit
        self._http2 = http2
        self._dispatching: set[ProtocolDispatch] = set()
        audit.metrics.connections_open.set_function(self.connection_count)

    def connection_count(self) -> int:
        count = super().connection_count()
        if self._http2 is not None:
            count += len(self._dispatching) + len(self._http2.connections)
        return count

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        if self._http2 is not None:
            await self._http2.shutdown(timeout if timeout is not None else 0.0)
        await super().shutdown(timeout)

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        # The asyncio protocol factory. Over the bound it builds a `RefusedConnection`, which
        # is deliberately no HTTP connection (no parser, no task, nothing registered).
        bound = self._limits.max_connections
        http2 = self._http2
        if http2 is not None:
            if self.connection_count() >= bound:
                return http2.refused(self._audit, bound)
            dispatch = ProtocolDispatch(http2, self._limits, self._audit, self._dispatching.discard)
            self._dispatching.add(dispatch)
            return dispatch
        if self.connection_count() >= bound:
            return RefusedConnection(self._audit, bound)
        return GuardedConnection(
            self,
            loop=self.event_loop(),
            head_timeout=self._limits.request_head_timeout,
            audit=self._audit,
            **self.connection_options(),
        )
