"""HTTP/2 on the proxied port: an asyncio protocol driving `h2` (sans-IO) as the server.

With `--upstream-protocol http2` every client connection is handed here by
`connections.ProtocolDispatch` once it sent the HTTP/2 client preface. Each request stream
gets one task, `Http2Gateway.serve`, which runs the same stages as HTTP/1.1
(`pipeline.Pipeline`: normalise `:path`, authenticate, tenant, overrides, `decide()`, rate
limit, identity headers, audit) and only then opens a stream to the backend through the
HTTP/2 upstream pool; a refusal never reaches the backend. A gRPC request is refused the
gRPC way (a trailers-only response, `grpc.py`); any other request gets an HTTP/2 response
with the JSON body HTTP/1.1 refusals have.

What is refused before or beside the pipeline, and how (docs/proxy.md "HTTP/2 and gRPC"):

- a malformed header block (missing, duplicate, unknown or misplaced pseudo-headers,
  upper-case names, connection-specific headers, `te` other than `trailers`, `:authority`
  and `host` disagreeing): h2's own validators, run here per stream so the answer is a
  400 on that stream (audited) rather than the whole connection;
- a header list over `MAX_HEADER_LIST_SIZE` (counted as RFC 9113 does): 431; h2 applies
  the advertised SETTINGS_MAX_HEADER_LIST_SIZE only once the client has acknowledged it,
  and a header block split over more than 64 CONTINUATION frames ends the connection
  (h2's bound on CONTINUATION floods) with GOAWAY, audited;
- more than `RESET_BUDGET` streams reset by the client within `RESET_WINDOW` seconds
  (rapid reset, CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM, audited;
- more than `MAX_CONCURRENT_STREAMS` open streams, any other protocol error: h2's GOAWAY,
  audited.

Flow control gives backpressure both ways with bounded buffers: request DATA is credited
back to the client (WINDOW_UPDATE) only once the backend stream took it, so each stream
buffers at most its 64 KiB window and a connection at most `CONNECTION_WINDOW`; response
DATA is pulled from the backend only when the client's window and the socket have room,
so a slow client slows the backend (the pool returns the backend's credit as data is
taken).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import orjson
from aiohttp import HttpVersion, web
from h2.errors import ErrorCodes
from h2.utilities import HeaderValidationFlags, validate_headers
from hyperframe.frame import GoAwayFrame
from multidict import CIMultiDict, CIMultiDictProxy

from nhigate.policy import Policy, Reason
from nhigate.policy.mcp import mcp_endpoint_of
from nhigate.proxy.connections import ConnectionAudit, ConnectionLimits
from nhigate.proxy.forward import (
    UnsafeHeadError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from nhigate.proxy.grpc import grpc_method, grpc_status, is_grpc, trailers_only
from nhigate.proxy.headers import filter_response_headers
from nhigate.proxy.overrides import (
    BodyOverrideError,
    FormOverrideScanner,
    form_kind,
)
from nhigate.proxy.pipeline import DenyError, Exchange, Pipeline

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 section 3.4)."""

HTTP2 = HttpVersion(2, 0)

MAX_CONCURRENT_STREAMS = 100
"""Streams one connection may have open (advertised; h2 refuses more with GOAWAY)."""

MAX_HEADER_LIST_SIZE = 32 * 1024
"""Largest request header list (name + value + 32 per field, as RFC 9113 counts) -> 431."""

HARD_HEADER_LIST_SIZE = 64 * 1024
"""Header lists larger than this are not even decoded: GOAWAY (h2's HPACK bomb bound)."""

CONNECTION_WINDOW = 1024 * 1024
"""Request bytes a connection may have buffered across its streams (flow-control window)."""

RESET_WINDOW = 10.0
RESET_BUDGET = 200
"""More than `RESET_BUDGET` client stream resets within `RESET_WINDOW` seconds on one
connection is rapid reset (CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM."""

LINGER = 1.0
"""Seconds a refused connection's incoming bytes are drained before it is closed."""

MAX_WRITE_BACKLOG = 4 * 1024 * 1024
"""Bytes queued towards a client that does not read (control-frame answers included)
before its connection is dropped."""

_REQUEST_FLAGS = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILER_FLAGS = HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False
)

Headers = list[tuple[bytes, bytes]]


class UpstreamStream(Protocol):
    """One request stream to the backend (`h2_upstream.H2UpstreamStream`)."""

    async def send_data(self, data: bytes) -> None: ...

    async def end(self, trailers: Headers | None = None) -> None: ...

    async def response_head(self) -> tuple[int, Headers]: ...

    async def next_data(self) -> bytes:
        """The next response chunk; b"" at the end of the body."""

    def trailers(self) -> Headers | None: ...

    def reset(self, error_code: int = ...) -> None: ...


class UpstreamStreams(Protocol):
    """The HTTP/2 backend pool (`h2_upstream.H2UpstreamPool`)."""

    async def open_stream(self, headers: Headers, *, end_stream: bool) -> UpstreamStream: ...

    async def close(self) -> None: ...


class StreamGoneError(Exception):
    """The client reset the stream or the connection went away."""


def header_list_size(headers: Headers) -> int:
    """The size of a header list as SETTINGS_MAX_HEADER_LIST_SIZE counts it."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


class InboundStream:
    """One client request stream: its header block (as a `RequestView`) and its body."""

    __slots__ = (
        "_body",
        "_ended",
        "_waiter",
        "authority",
        "connection",
        "gone",
        "headers",
        "method",
        "raw",
        "raw_path",
        "request_trailers",
        "stream_id",
        "task",
    )

    def __init__(self, conn: Http2Connection, stream_id: int, raw: Headers, ended: bool) -> None:
        self.connection = conn
        """The client connection the stream is on."""
        self.stream_id = stream_id
        self.raw = raw
        self.method = ""
        self.raw_path = ""
        self.authority = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self._body: collections.deque[tuple[bytes, int]] = collections.deque()
        self._ended = ended
        self._waiter: asyncio.Future[None] | None = None
        self.gone = False
        self.request_trailers: Headers | None = None
        self.task: asyncio.Task[None] | None = None

    # -- RequestView -----------------------------------------------------------------------

    @property
    def version(self) -> HttpVersion:
        return HTTP2

    @property
    def remote(self) -> str | None:
        return self.connection.peer

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.connection.transport

    # -- the header block ------------------------------------------------------------------

    def parse(self) -> None:
        """Validate the header block (h2's validators, the size bound) and fill the view.

        `:authority` becomes `Host` (h2's validator refused a `host` that disagrees)."""
        raw = self.raw
        try:
            validated = list(validate_headers(raw, _REQUEST_FLAGS))
        except h2.exceptions.ProtocolError as exc:
            raise DenyError(Reason.REQUEST_REJECTED, f"malformed HTTP/2 request: {exc}") from None
        size = header_list_size(validated)
        if size > MAX_HEADER_LIST_SIZE:
            detail = f"header list of {size} bytes > {MAX_HEADER_LIST_SIZE}"
            raise DenyError(Reason.REQUEST_REJECTED, detail, status=431)
        headers: CIMultiDict[str] = CIMultiDict()
        authority: str | None = None
        for name, value in validated:
            text = value.decode("latin-1")
            if name[:1] == b":":
                if name == b":method":
                    self.method = text
                elif name == b":path":
                    self.raw_path = text
                elif name == b":authority":
                    authority = text
            else:
                headers.add(name.decode("latin-1"), text)
        if authority is not None:
            self.authority = authority
            if "Host" not in headers:
                headers["Host"] = authority
        else:
            self.authority = headers.get("Host", "")
        self.headers = CIMultiDictProxy(headers)

    # -- the body --------------------------------------------------------------------------

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        self._body.append((data, flow_controlled))
        self._wake()

    def on_end(self) -> None:
        self._ended = True
        self._wake()

    def on_gone(self) -> None:
        self.gone = True
        self._wake()

    @property
    def ended(self) -> bool:
        """The client has sent its whole body (END_STREAM) and all of it was read."""
        return self._ended and not self._body

    async def read(self) -> tuple[bytes, int] | None:
        """The next body chunk and its flow-controlled length (credit it with `credit` once
        it is forwarded); None at the end of the body."""
        while not self._body:
            if self._ended:
                return None
            if self.gone:
                raise StreamGoneError
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._body.popleft()

    def credit(self, flow_controlled: int) -> None:
        """Let the client send `flow_controlled` more bytes on this stream."""
        self.connection.credit(self.stream_id, flow_controlled)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Http2Connection(asyncio.Protocol):
    """One client HTTP/2 connection: h2's state machine, flow control, timers, bounds."""

    def __init__(
        self,
        gateway: Http2Gateway,
        limits: ConnectionLimits,
        audit: ConnectionAudit,
        on_lost: Callable[[Http2Connection], None],
    ) -> None:
        self._gateway = gateway
        self._limits = limits
        self._audit = audit
        self._on_lost = on_lost
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # validated per stream: a 400, not a GOAWAY
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._streams: dict[int, InboundStream] = {}
        self._resets: collections.deque[float] = collections.deque()
        self._settings_acked = False
        self._requests = 0
        self._paused = False
        self._write_waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._discarding = False
        """Refused: what the client still sends is dropped until the socket closes."""
        self._accepted_at = 0.0
        self.closed = self._loop.create_future()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        h2c = self._h2
        h2c.local_settings.update(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        self._accepted_at = self._loop.time()
        self._arm(self._accepted_at + self._limits.request_head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 prepared a GOAWAY
            self._refuse_connection(f"HTTP/2 protocol error: {exc}")
            return
        for event in events:
            self._dispatch(event)
            if self.transport is None or self._discarding:
                return
        self._flush()
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_WRITE_BACKLOG:
            self._refuse_connection("client does not read its answers: connection dropped")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self._streams.values()):
            self._stream_gone(stream)
        self._wake_writers()
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # -- events ----------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is None or stream.gone:  # nobody will read it: give the credit back
                self._h2.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id or 0
                )
            else:
                stream.on_data(event.data or b"", event.flow_controlled_length or 0)
        elif isinstance(event, h2.events.TrailersReceived):
            self._on_trailers(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.on_end()
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_writers()
        elif isinstance(event, h2.events.SettingsAcknowledged):
            self._settings_acked = True
            # h2 now decodes at most what we advertised and ends the connection beyond it;
            # keep its hard bound above ours, so a list over ours is a 431 on its stream.
            self._h2.decoder.max_header_list_size = HARD_HEADER_LIST_SIZE
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY: h2 allows nothing more to be sent after it, so the
            # streams still open end here.
            self._closing = True
            for stream in list(self._streams.values()):
                self._stream_gone(stream)
            self._close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        if self._closing:  # after our GOAWAY: not processed, the client may retry it
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = InboundStream(
            self, stream_id, list(event.headers or ()), event.stream_ended is not None
        )
        self._streams[stream_id] = stream
        self._requests += 1
        if self._timer is not None:  # a request is open: no head or idle deadline applies
            self._timer.cancel()
            self._timer = None
        stream.task = self._loop.create_task(self._serve(stream))

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is None:
            return
        trailers = list(event.headers or ())
        try:
            stream.request_trailers = list(validate_headers(trailers, _TRAILER_FLAGS))
        except h2.exceptions.ProtocolError:
            self.reset(stream.stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._stream_gone(stream)
            return
        stream.on_end()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is not None:
            self._stream_gone(stream)
        if not event.remote_reset:
            return
        now = self._loop.time()
        resets = self._resets
        resets.append(now)
        while resets and resets[0] < now - RESET_WINDOW:
            resets.popleft()
        if len(resets) > RESET_BUDGET:
            detail = (
                f"rapid reset: {len(resets)} streams reset by the client within "
                f"{RESET_WINDOW:g} s (> {RESET_BUDGET}): GOAWAY ENHANCE_YOUR_CALM"
            )
            self._h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._refuse_connection(detail)

    async def _serve(self, stream: InboundStream) -> None:
        try:
            await self._gateway.serve(stream)
        finally:
            self._streams.pop(stream.stream_id, None)
            if self.transport is not None and not self._streams and not self._discarding:
                if self._closing:
                    self._close()
                else:  # idle from now on
                    self._arm(self._loop.time() + self._limits.idle_timeout)

    def _stream_gone(self, stream: InboundStream) -> None:
        stream.on_gone()
        task = stream.task
        if task is not None and not task.done():
            task.cancel()

    # -- timers ----------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._deadline)

    def _deadline(self) -> None:
        """The head deadline (no SETTINGS ack or no request in time) or the idle timeout."""
        self._timer = None
        if self.transport is None or self._streams:
            return
        timeout = self._limits.request_head_timeout
        waited = self._loop.time() - self._accepted_at
        if not self._settings_acked:
            self._h2.close_connection(ErrorCodes.SETTINGS_TIMEOUT)
            detail = f"SETTINGS not acknowledged within {timeout:g} s: GOAWAY SETTINGS_TIMEOUT"
            self._audit.protocol_refusal(
                Reason.REQUEST_TIMEOUT, secrets.token_hex(8), self.peer, detail, waited
            )
        elif self._requests == 0:
            self._h2.close_connection(ErrorCodes.NO_ERROR)
            detail = f"no request within {timeout:g} s: GOAWAY"
            self._audit.protocol_refusal(
                Reason.REQUEST_TIMEOUT, secrets.token_hex(8), self.peer, detail, waited
            )
            self._audit.metrics.client_timeouts.labels("head").inc()
        else:
            self._h2.close_connection(ErrorCodes.NO_ERROR)
            self._audit.idle_timeout()
        self._close()

    # -- writing ---------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        transport = self.transport
        if data and transport is not None:
            transport.write(data)

    def _wake_writers(self) -> None:
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _writable(self) -> None:
        waiter = self._loop.create_future()
        self._write_waiters.append(waiter)
        await waiter

    def _check(self, stream: InboundStream) -> None:
        if stream.gone or self.transport is None:
            raise StreamGoneError

    def send_headers(self, stream: InboundStream, headers: Headers, *, end: bool) -> None:
        """A HEADERS frame (response head, trailers or a trailers-only answer)."""
        self._check(stream)
        try:
            self._h2.send_headers(stream.stream_id, headers, end_stream=end)
        except h2.exceptions.ProtocolError:  # the stream or (client GOAWAY) connection closed
            raise StreamGoneError from None
        self._flush()

    async def send_data(self, stream: InboundStream, data: bytes, *, end: bool = False) -> None:
        """DATA within the client's flow-control window, waiting while it or the socket
        is full (this wait is what slows the backend down)."""
        view = memoryview(data)
        while True:
            self._check(stream)
            if self._paused:
                await self._writable()
                continue
            h2c = self._h2
            try:
                window = h2c.local_flow_control_window(stream.stream_id)
                size = min(window, h2c.max_outbound_frame_size, len(view))
                if size <= 0 and len(view):
                    await self._writable()
                    continue
                last = size == len(view)
                h2c.send_data(stream.stream_id, bytes(view[:size]), end_stream=end and last)
            except h2.exceptions.ProtocolError:
                raise StreamGoneError from None
            self._flush()
            view = view[size:]
            if last:
                return

    def end(self, stream: InboundStream) -> None:
        """END_STREAM with no trailers."""
        self._check(stream)
        try:
            self._h2.end_stream(stream.stream_id)
        except h2.exceptions.ProtocolError:
            raise StreamGoneError from None
        self._flush()

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM, unless the stream is already closed."""
        if self.transport is None:
            return
        try:
            self._h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def finish(self, stream: InboundStream) -> None:
        """After the answer: a client still sending a body it no longer needs to is told
        to stop (RFC 9113 section 8.1), without an error."""
        if stream.ended or stream.gone or self.transport is None:
            return
        try:
            state = self._h2.streams.get(stream.stream_id)
            if state is not None and not state.closed:
                self._h2.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
                self._flush()
        except h2.exceptions.ProtocolError:
            return

    def credit(self, stream_id: int, size: int) -> None:
        if self.transport is None or size <= 0:
            return
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    # -- closing ---------------------------------------------------------------------------

    def _refuse_connection(self, detail: str) -> None:
        """A connection-level refusal: h2 has a GOAWAY ready; send it, audit, close.

        The client's bytes are read and dropped for `LINGER` seconds first: closing a
        socket with unread data resets it, and the reset can destroy the GOAWAY in flight."""
        self._flush()
        request_id = secrets.token_hex(8)
        self._audit.protocol_refusal(Reason.REQUEST_REJECTED, request_id, self.peer, detail)
        for stream in list(self._streams.values()):
            self._stream_gone(stream)
        self._discarding = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(LINGER, self._close)

    def _close(self) -> None:
        transport = self.transport
        if transport is not None:
            self._flush()
            transport.close()

    def go_away(self) -> None:
        """Graceful shutdown: GOAWAY, finish the open streams, then close.

        The GOAWAY frame is written directly: h2's state machine treats a GOAWAY it sends
        as the end of the connection and would refuse to answer the streams still open."""
        transport = self.transport
        if transport is None or self._closing:
            return
        self._closing = True
        self._flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        transport.write(frame.serialize())
        if not self._streams:
            self._close()

    def abort(self) -> None:
        """Shutdown after the drain timeout: every stream ends now."""
        for stream in list(self._streams.values()):
            self._stream_gone(stream)
        transport = self.transport
        if transport is not None:
            transport.abort()


class RefusedHttp2Connection(asyncio.Protocol):
    """A connection over `--max-connections` on an HTTP/2 port: the server preface and a
    GOAWAY (REFUSED_STREAM, last stream 0: nothing was processed, retry elsewhere), written
    at once and closed; audited `connection_limit` like the HTTP/1.1 503."""

    def __init__(self, audit: ConnectionAudit, bound: int) -> None:
        self._audit = audit
        self._bound = bound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        h2c.close_connection(ErrorCodes.REFUSED_STREAM, b"connection limit")
        stream = cast(asyncio.Transport, transport)
        stream.write(h2c.data_to_send())
        stream.close()
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._audit.refused(secrets.token_hex(8), host, self._bound)


class Http2Gateway:
    """Runs the pipeline on each HTTP/2 request stream and forwards it over HTTP/2."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.pool: UpstreamStreams | None = None
        settings = pipeline.state.settings
        self._upstream_url = settings.upstream.url
        self._scheme = settings.upstream.scheme.encode("ascii")
        self._authority = settings.upstream.authority.encode("latin-1")
        self._max_body = settings.max_body_bytes
        self.connections: set[Http2Connection] = set()

    def connection(self, limits: ConnectionLimits, audit: ConnectionAudit) -> Http2Connection:
        """A protocol for a new client connection (registered until it is lost)."""
        conn = Http2Connection(self, limits, audit, self.connections.discard)
        self.connections.add(conn)
        return conn

    async def shutdown(self, grace: float) -> None:
        """GOAWAY on every connection, `grace` seconds for their streams, then abort."""
        connections = list(self.connections)
        for conn in connections:
            conn.go_away()
        waiting = [conn.closed for conn in connections if not conn.closed.done()]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=grace)
            if pending:
                for conn in connections:
                    conn.abort()
                await asyncio.wait(pending, timeout=1.0)

    def refused(self, audit: ConnectionAudit, bound: int) -> asyncio.Protocol:
        """A connection over the bound: SETTINGS and GOAWAY REFUSED_STREAM, closed, audited."""
        return RefusedHttp2Connection(audit, bound)

    # -- one stream ------------------------------------------------------------------------

    async def serve(self, stream: InboundStream) -> None:
        pipeline = self.pipeline
        state = pipeline.state
        state.inflight += 1
        ex = Exchange(
            request_id=pipeline.request_ids(),
            started=time.perf_counter(),
            now=state.clock(),
            method="-",
            path="",
            answers_expect=False,
        )
        grpc_call = False
        try:
            stream.parse()
            ex.method = stream.method
            grpc_call = is_grpc(stream.headers.get("content-type"))
            await self._pipeline(stream, ex, grpc_call)
        except DenyError as denied:
            await self._deny(stream, ex, denied, grpc_call)
        except (StreamGoneError, asyncio.CancelledError):
            # Reset by the client, or h2 refused to send on it: either way it is over.
            stream.connection.reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
            if ex.decision is not None and ex.decision.allowed and not ex.audited:
                pipeline.audit_allowed(ex, ex.status, "the stream ended before the answer did")
        except Exception as exc:  # fail closed: deny and audit, never crash
            log.exception("internal error handling HTTP/2 request %s", ex.request_id)
            failure = DenyError(Reason.INTERNAL_ERROR, type(exc).__name__)
            await self._deny(stream, ex, failure, grpc_call)
        finally:
            state.inflight -= 1

    async def _pipeline(self, stream: InboundStream, ex: Exchange, grpc_call: bool) -> None:
        pipeline = self.pipeline
        path, query, authorization = pipeline.target(stream, ex)
        if grpc_call:
            ex.grpc = grpc_method(path)
        policy, identity = await pipeline.identify(stream, ex, query, authorization)
        service = policy.document.service
        if service.mcp_endpoints and mcp_endpoint_of(service, path) is not None:
            raise DenyError(Reason.REQUEST_REJECTED, "MCP endpoints are served over HTTP/1.1")
        pipeline.admit(policy, ex, identity, path)
        await self._forward(stream, ex, policy, path + query)

    def _upstream_head(
        self, stream: InboundStream, ex: Exchange, policy: Policy, target: str
    ) -> Headers:
        """The request head for the backend: pseudo-headers first, the HTTP/1.1 path's
        header rules (caller credential and proxy-owned names out, identity in), names
        lower-case, `te: trailers` kept (gRPC needs it; it is the only `te` h2 accepts)."""
        identity = ex.identity
        decision = ex.decision
        assert identity is not None
        assert decision is not None
        service = policy.document.service
        headers = self.pipeline.upstream_headers(stream, ex, service, identity, decision)
        out: Headers = [
            (b":method", ex.method.encode("ascii")),
            (b":scheme", self._scheme),
            (b":authority", self._authority),
            (b":path", target.encode("latin-1")),
        ]
        for name, value in headers:
            lower = name.lower()
            if lower == "host":
                continue  # `:authority` above, as the HTTP/1.1 path sets Host
            out.append((lower.encode("latin-1"), value.encode("latin-1")))
        if any(value.lower() == "trailers" for value in stream.headers.getall("te", ())):
            out.append((b"te", b"trailers"))
        return out

    async def _forward(
        self, stream: InboundStream, ex: Exchange, policy: Policy, target: str
    ) -> None:
        pool = self.pool
        if pool is None:
            raise DenyError(Reason.UPSTREAM_UNAVAILABLE, "no HTTP/2 upstream pool")
        length = stream.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise DenyError(Reason.BODY_TOO_LARGE, f"Content-Length {length} > {self._max_body}")
        head = self._upstream_head(stream, ex, policy, target)
        form = form_kind(stream.headers.get("content-type", ""))
        conn = stream.connection
        sent = time.perf_counter()
        try:
            upstream = await pool.open_stream(head, end_stream=stream.ended)
        except UnsafeHeadError as exc:  # a header h2 must not send: never send the request
            raise DenyError(Reason.INTERNAL_ERROR, f"unsafe upstream request head: {exc}") from None
        except UpstreamTimeoutError as exc:
            raise DenyError(Reason.UPSTREAM_TIMEOUT, str(exc)) from None
        except UpstreamUnavailableError as exc:
            raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc)) from None
        pump: asyncio.Task[None] | None = None
        try:
            if not stream.ended:
                pump = asyncio.get_running_loop().create_task(
                    self._pump_body(stream, upstream, form)
                )
                pump.add_done_callback(_retrieved)
            try:
                status, response_headers = await self._response_head(upstream, pump)
            except UpstreamTimeoutError as exc:
                raise DenyError(Reason.UPSTREAM_TIMEOUT, str(exc)) from None
            except UpstreamUnavailableError as exc:
                if pump is not None and pump.done() and pump.exception() is not None:
                    self._raise_pump(pump)
                raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc)) from None
            if pump is not None and pump.done():
                self._raise_pump(pump)
            self.pipeline.state.metrics.upstream_duration.observe(time.perf_counter() - sent)
            ex.status = status
            await self._relay(stream, conn, ex, upstream, status, response_headers, pump)
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            # Always safe: frees the slot; RST_STREAM only for an exchange not over yet.
            upstream.reset()

    async def _response_head(
        self, upstream: UpstreamStream, pump: asyncio.Task[None] | None
    ) -> tuple[int, Headers]:
        """The backend's response head; a request body that fails first (too large, an
        override in a form, the client gone) ends the wait with its refusal."""
        if pump is None or pump.done():
            return await upstream.response_head()
        head = asyncio.ensure_future(upstream.response_head())
        try:
            await asyncio.wait((head, pump), return_when=asyncio.FIRST_COMPLETED)
            if not head.done() and pump.exception() is not None:
                self._raise_pump(pump)
            return await head
        finally:
            if not head.done():
                head.cancel()

    def _raise_pump(self, pump: asyncio.Task[None]) -> None:
        exc = pump.exception()
        if isinstance(exc, DenyError):
            raise exc
        if isinstance(exc, StreamGoneError):
            raise exc
        if isinstance(exc, UnsafeHeadError):  # the caller's trailers: refused, not sent
            raise DenyError(Reason.REQUEST_REJECTED, f"request trailers refused: {exc}")
        if isinstance(exc, UpstreamTimeoutError):
            raise DenyError(Reason.UPSTREAM_TIMEOUT, str(exc))
        if isinstance(exc, UpstreamUnavailableError):
            raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc))
        if exc is not None:
            raise exc

    async def _pump_body(
        self, stream: InboundStream, upstream: UpstreamStream, form: str | None
    ) -> None:
        """Client body -> backend; each chunk credited back to the client once sent."""
        total = 0
        scanner = FormOverrideScanner(form) if form is not None else None
        while True:
            item = await stream.read()
            if item is None:
                break
            data, flow = item
            total += len(data)
            if total > self._max_body:
                raise DenyError(Reason.BODY_TOO_LARGE, f"body over {self._max_body} bytes")
            if scanner is not None:
                try:
                    scanner.feed(data)
                except BodyOverrideError as exc:
                    detail = f"method override: {exc.where}"
                    raise DenyError(Reason.OVERRIDE_REJECTED, detail) from None
            if data:
                await upstream.send_data(data)
            stream.credit(flow)
        if scanner is not None:
            try:
                scanner.finish()
            except BodyOverrideError as exc:
                raise DenyError(Reason.OVERRIDE_REJECTED, f"method override: {exc.where}") from None
        await upstream.end(stream.request_trailers)

    async def _relay(
        self,
        stream: InboundStream,
        conn: Http2Connection,
        ex: Exchange,
        upstream: UpstreamStream,
        status: int,
        response_headers: Headers,
        pump: asyncio.Task[None] | None,
    ) -> None:
        """Backend response -> client: head, body (flow-controlled), trailers."""
        head: Headers = [(b":status", str(status).encode("ascii"))]
        head.extend(_response_fields(response_headers))
        head.append((b"x-request-id", ex.request_id.encode("ascii")))
        detail: str | None = None
        status_in_head = _grpc_status_of(response_headers)
        if status_in_head is not None:
            # gRPC "Trailers-Only": the status is in the head, which ends the stream.
            ex.grpc_status = status_in_head
            conn.send_headers(stream, head, end=True)
            conn.finish(stream)
            ex.audited = True
            self.pipeline.audit_allowed(ex, status, detail)
            return
        conn.send_headers(stream, head, end=False)
        try:
            while True:
                chunk = await upstream.next_data()
                if not chunk:
                    break
                await conn.send_data(stream, chunk)
            trailers = upstream.trailers()
            if trailers:
                kept = _response_fields(trailers)
                ex.grpc_status = _grpc_status_of(kept)
                conn.send_headers(stream, kept, end=True)
            else:
                conn.end(stream)
        except (UpstreamUnavailableError, UpstreamTimeoutError) as exc:
            detail = f"upstream failed mid-body: {exc}"
            conn.reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
        if pump is not None and pump.done() and not pump.cancelled():
            failed = pump.exception()
            if failed is not None and not isinstance(failed, StreamGoneError):
                detail = f"request body failed after the response began: {failed}"
        conn.finish(stream)
        ex.audited = True
        self.pipeline.audit_allowed(ex, status, detail)

    # -- refusals --------------------------------------------------------------------------

    async def _deny(
        self, stream: InboundStream, ex: Exchange, denied: DenyError, grpc_call: bool
    ) -> None:
        """Audit the refusal and answer it: trailers-only for gRPC, else a JSON body."""
        reason = denied.reason
        status = denied.status
        grant = ex.decision.grant if ex.decision is not None else None
        if grpc_call:
            ex.grpc_status = grpc_status(status)
        self.pipeline.record(ex, "deny", reason, grant, status, denied.detail)
        ex.audited = True
        conn = stream.connection
        extra: Headers = [(b"x-request-id", ex.request_id.encode("ascii"))]
        for name, value in (denied.extra_headers or {}).items():
            extra.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        try:
            if grpc_call:
                message = reason.value
                if denied.detail is not None:
                    message = f"{message}: {denied.detail}"
                conn.send_headers(stream, trailers_only(status, message, extra), end=True)
            else:
                body = denied.body or orjson.dumps(
                    {"error": reason.value, "request_id": ex.request_id}
                )
                head: Headers = [
                    (b":status", str(status).encode("ascii")),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode("ascii")),
                    *extra,
                ]
                conn.send_headers(stream, head, end=False)
                await conn.send_data(stream, body, end=True)
        except StreamGoneError:
            return
        conn.finish(stream)


HTTP2_GATEWAY: web.AppKey[Http2Gateway] = web.AppKey("nhigate_http2_gateway", Http2Gateway)
"""The HTTP/2 front of an application whose upstream speaks HTTP/2 (absent otherwise)."""


def _response_fields(headers: Headers) -> Headers:
    """The backend's response headers or trailers as sent on: hop-by-hop and
    `Connection`-named ones dropped (headers.py), no pseudo-headers, names lower-case."""
    kept = filter_response_headers(h for h in headers if h[0][:1] != b":")
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in kept]


def _retrieved(task: asyncio.Task[None]) -> None:
    """The body pump's failure is read where it matters (`_raise_pump`); never logged as lost."""
    if not task.cancelled():
        task.exception()


def _grpc_status_of(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"grpc-status":
            try:
                return int(value)
            except ValueError:
                return None
    return None
