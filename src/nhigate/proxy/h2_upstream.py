"""A pooled HTTP/2 client for the one upstream the proxy forwards to (gRPC backends, issue 17).

HTTP/2 multiplexes many exchanges over one connection, so this pool is not `forward.py`'s
one-exchange-per-connection pool: each `_Connection` is an `asyncio.Protocol` driving a
sans-IO `h2` state machine and carries up to the backend's SETTINGS_MAX_CONCURRENT_STREAMS
streams; the pool opens up to `max_connections` of them and otherwise waits for a free slot.
`http://` upstreams are spoken to as h2c with prior knowledge, `https://` ones over TLS that
must negotiate ALPN `h2`.

Bounded by construction:
- a stream's unread response data is bounded by the stream window we advertise
  (`STREAM_WINDOW`) and a connection's by `CONNECTION_WINDOW`: credit goes back to the backend
  only when the caller takes a chunk (`next_data`), so a slow client slows the backend;
- response header lists by `MAX_HEADER_LIST_SIZE` (our SETTINGS_MAX_HEADER_LIST_SIZE, enforced
  by h2's HPACK decoder: a larger block is a connection error);
- what we write by the backend's windows and the transport's write buffer.

Failures are typed so a caller can tell what is safe to send again:
- `StreamRefusedError` (REFUSED_STREAM, or a GOAWAY whose last_stream_id is below the
  stream): the backend did not process the stream (RFC 9113 section 8.7): safe to retry,
  whatever the method. The pool itself sends such a stream again, on a connection with a
  free slot, while its request so far fits `REPLAY_LIMIT` (see `H2UpstreamStream`); the
  caller sees the refusal only after `MAX_REFUSALS` or beyond that limit;
- every failure the backend causes after `open_stream` returned is a `NotRetriedError`
  (`StreamResetError`, `UpstreamProtocolError`, a lost connection) or an
  `UpstreamTimeoutError`: the backend may have acted on the request.

h2 (4.4.1) treats a received GOAWAY as the end of the connection and raises on any later
frame (python-hyper/h2 issue 1199), which would fail every in-flight stream of a backend that
shuts down gracefully (gRPC servers send GOAWAY(NO_ERROR) first and let streams finish):
`_DrainingH2Connection` keeps the connection open after a NO_ERROR GOAWAY so the streams the
backend promised to finish can finish; no new stream is ever opened on it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from nhigate.proxy.forward import (
    NotRetriedError,
    UnsafeHeadError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from nhigate.proxy.settings import Upstream

if TYPE_CHECKING:
    from hyperframe.frame import Frame, GoAwayFrame  # h2's own framing layer

STREAM_WINDOW = 256 * 1024
"""Our SETTINGS_INITIAL_WINDOW_SIZE: response bytes one stream may have unread."""

CONNECTION_WINDOW = 4 * 1024 * 1024
"""Connection-level receive window: response bytes all streams of one connection may have
unread (so 8 connections buffer at most 32 MiB however slow the clients are)."""

MAX_HEADER_LIST_SIZE = 64 * 1024
"""Our SETTINGS_MAX_HEADER_LIST_SIZE: largest decoded response header (or trailer) list, the
same bound as the HTTP/1.1 pool's response head."""

WRITE_NOW_SIZE = 16 * 1024
"""Request body frames this large are written at once and waited on (the transport's buffer
limit); smaller ones join the iteration's single write."""

MAX_STREAMS_PER_CONNECTION = 100
"""Streams put on one connection even when the backend allows more (or sets no limit, as
its SETTINGS may): more connections spread the work of a backend that has several cores."""

REPLAY_LIMIT = 64 * 1024
"""Request bytes kept per stream until the response head arrives, so that a stream the backend
refused unprocessed can be sent again without the caller (gRPC keeps 256 KiB for the same)."""

MAX_REFUSALS = 4
"""Times one request is sent again after refusals before the refusal reaches the caller."""

DEFAULT_IDLE_TIMEOUT = 60.0
"""Seconds a connection with no open stream is kept before it is closed."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
"""RFC 9110 `token`, lower-case (HTTP/2 field names are lower-case)."""

_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
"""RFC 9113 section 8.2.2: names an HTTP/2 message must not carry."""

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_NEVER_INDEXED = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"x-request-id",
        b"grpc-timeout",
        b"traceparent",
        b"tracestate",
    }
)

NEVER_INDEX_LONGER_THAN = 128
"""Longer header values (tokens, identity assertions) are sent literally, never indexed."""
_VALUE_FORBIDDEN = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")


class StreamRefusedError(UpstreamUnavailableError):
    """The backend did not process the stream (REFUSED_STREAM or above a GOAWAY's
    last_stream_id): sending the same request again is safe, whatever its method."""


class StreamResetError(NotRetriedError):
    """The backend reset the stream after it may have acted on it."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code
        """The RST_STREAM (or GOAWAY) error code."""


class UpstreamProtocolError(NotRetriedError):
    """The backend broke HTTP/2 or sent a malformed response (-> 502)."""


def client_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying TLS client context offering only ALPN `h2` (what `https://` upstreams need)."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def request_header_block(
    headers: list[tuple[bytes, bytes]], *, trailers: bool = False
) -> list[tuple[bytes, bytes]]:
    """`headers` checked and marked for HPACK, or `UnsafeHeadError` for a list h2 must not be
    asked to encode.

    The inbound side filters headers already; this is the last check, and it must come before
    h2: h2 validates while it HPACK-encodes, so a refusal there would leave the connection's
    compression state ahead of what the backend decoded. It is also the only check: h2's own
    outbound validation and normalisation (which cost a third of encoding a request) are off.
    Values that are credentials (HPACK's CRIME-style guessing, RFC 7541 section 7.1.3), differ
    on every request or are long are never indexed: they would only churn the dynamic table
    that every other header of the connection is looked up in.
    """
    regular = False
    seen: dict[bytes, bytes] = {}
    host = None
    block: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name[:1] == b":":
            if trailers or regular or name not in _REQUEST_PSEUDO or name in seen:
                raise UnsafeHeadError(f"pseudo-header {name[:32]!r} misplaced or unknown")
            seen[name] = value
        else:
            regular = True
            if _TOKEN.fullmatch(name) is None:
                raise UnsafeHeadError(f"header name {name[:64]!r} is not a lower-case token")
            if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
                raise UnsafeHeadError(f"connection-specific header {name!r}")
            if name == b"host":
                host = value
        if _VALUE_FORBIDDEN.search(value) is not None:
            raise UnsafeHeadError(f"header {name[:64]!r} value holds CR, LF, NUL or edge space")
        if name in _NEVER_INDEXED or len(value) > NEVER_INDEX_LONGER_THAN:
            block.append(NeverIndexedHeaderTuple(name, value))
        else:
            block.append((name, value))
    if trailers:
        return block
    if not (seen.get(b":method") and seen.get(b":scheme") and seen.get(b":path")):
        raise UnsafeHeadError("request needs :method, :scheme and :path")
    authority = seen.get(b":authority")
    if authority is None and host is None:
        raise UnsafeHeadError("request needs :authority (or host)")
    if authority is not None and host is not None and host != authority:
        raise UnsafeHeadError("host and :authority disagree")
    return block


def response_head(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The status and regular headers of a final response h2 accepted, or `UpstreamProtocolError`.

    h2 already refuses connection-specific names, `te` other than `trailers`, upper-case or
    control bytes in names, CR/LF/NUL and edge whitespace in values, unknown, duplicate,
    misplaced or request pseudo-headers, and a missing `:status`. It does not check that
    `:status` is three digits, that it is not 101 (forbidden in HTTP/2), nor that a name is an
    HTTP token (it lets `"(),/;<=>?@[]{}` through): those are checked here.
    """
    status = 0
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            if len(value) != 3 or not value.isdigit():
                raise UpstreamProtocolError(f"invalid :status {value[:16]!r} from upstream")
            status = int(value)
        elif _TOKEN.fullmatch(name) is None:
            raise UpstreamProtocolError(f"invalid header name {name[:64]!r} from upstream")
        else:
            regular.append((name, value))
    if not 200 <= status <= 599:
        raise UpstreamProtocolError(f"unexpected :status {status} from upstream")
    return status, regular


def _check_field_names(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    for name, _ in headers:
        if _TOKEN.fullmatch(name) is None:
            raise UpstreamProtocolError(f"invalid trailer name {name[:64]!r} from upstream")
    return headers


class H2UpstreamStream:
    """One request/response exchange on a pooled HTTP/2 connection.

    Call `end()` (or `reset()`) once the request is sent, and read the response to `b""` or
    `reset()` it: a stream left half open holds a slot of the backend's concurrency limit, and
    unread data holds connection window. `reset()` is always safe to call again.

    A stream the backend refuses before answering (REFUSED_STREAM, or above a GOAWAY's
    last_stream_id: it was not processed) is sent again on a connection with a free slot, up
    to `MAX_REFUSALS` times, while what was sent of it fits `REPLAY_LIMIT` (a unary gRPC
    call, typically): grpcio refuses streams it is still cleaning up after, and a backend
    restarting refuses the streams it will not serve. Beyond that the refusal reaches the
    caller as `StreamRefusedError`.
    """

    __slots__ = (
        "_attempts",
        "_chunks",
        "_conn",
        "_end_trailers",
        "_error",
        "_head",
        "_local_ended",
        "_refusal",
        "_remote_ended",
        "_replay",
        "_replay_size",
        "_request",
        "_reset_quietly",
        "_retry",
        "_send_waiter",
        "_trailers",
        "_unacked",
        "_waiter",
        "stream_id",
    )

    def __init__(
        self, conn: _Connection, request: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> None:
        self._conn = conn
        self.stream_id = 0
        """The HTTP/2 stream identifier on its current connection (odd, increasing)."""
        self._request = request
        self._head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._chunks: deque[bytes] = deque()
        self._unacked = 0
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._local_ended = end_stream
        self._remote_ended = False
        self._reset_quietly = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._send_waiter: asyncio.Future[None] | None = None
        self._replay: list[bytes] | None = []
        """Request body sent so far, while the stream may still be sent again (else None)."""
        self._replay_size = 0
        self._end_trailers: list[tuple[bytes, bytes]] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._refusal: StreamRefusedError | None = None
        self._attempts = 0

    # -- request -------------------------------------------------------------------------

    def _sendable(self) -> bool:
        """False when what is left of the request is to be dropped; raises when it failed."""
        if self._reset_quietly:
            return False  # the backend answered in full and asked us to stop (RFC 9113 8.1)
        if self._error is not None:
            raise self._error
        if self._local_ended:
            raise RuntimeError("the request was already ended")
        return True

    async def send_data(self, data: bytes) -> None:
        """Send request body bytes, split to the backend's frame size and windows."""
        view = memoryview(data)
        while view:
            if self._retry is not None:
                await asyncio.shield(self._retry)
                continue
            if not self._sendable():
                return
            conn = self._conn
            h2conn = conn.h2
            window = h2conn.local_flow_control_window(self.stream_id)
            if window <= 0:
                await self._wait_window()
                continue
            size = min(len(view), window, h2conn.max_outbound_frame_size)
            chunk, view = view[:size], view[size:]
            h2conn.send_data(self.stream_id, chunk)
            if self._replay is not None:
                self._keep_for_replay(chunk)
            if size >= WRITE_NOW_SIZE:
                conn.write_now()
                await conn.drain()
            else:
                conn.flush()
        if self._error is not None and not self._reset_quietly:
            raise self._error

    def _keep_for_replay(self, chunk: memoryview) -> None:
        assert self._replay is not None
        self._replay_size += len(chunk)
        if self._replay_size > REPLAY_LIMIT:
            self._replay = None  # too much to keep: a refusal from now on reaches the caller
        else:
            self._replay.append(bytes(chunk))

    async def _wait_window(self) -> None:
        conn = self._conn
        self._send_waiter = waiter = conn.loop.create_future()
        try:
            async with asyncio.timeout(conn.timeout):
                await waiter
        except TimeoutError:
            self.reset()
            raise UpstreamTimeoutError(
                f"upstream opened no flow-control window for {conn.timeout:g}s"
            ) from None
        finally:
            self._send_waiter = None

    async def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """End the request (END_STREAM), with trailers when given."""
        if trailers:
            trailers = request_header_block(trailers, trailers=True)
        while self._retry is not None:
            await asyncio.shield(self._retry)
        if not self._sendable():
            return
        conn = self._conn
        if trailers:
            conn.send_headers(self.stream_id, trailers, end_stream=True)
        else:
            conn.h2.end_stream(self.stream_id)
        self._local_ended = True
        self._end_trailers = trailers
        conn.flush()
        if self._remote_ended:
            conn.stream_closed(self)
        await conn.drain()

    def reset(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abandon the exchange (RST_STREAM unless it is over already); frees its slot and
        returns the connection window its unread data held."""
        conn = self._conn
        if self._unacked:
            conn.acknowledge(self.stream_id, self._unacked)
            self._unacked = 0
        self._chunks.clear()
        self._replay = None
        if self._error is None:
            self._error = UpstreamUnavailableError("the stream was reset by the proxy")
        if not (self._local_ended and self._remote_ended) and not self._reset_quietly:
            conn.reset_stream(self.stream_id, error_code)
        self._local_ended = self._remote_ended = True
        conn.stream_closed(self)
        self._wake()

    def refused(self, error: StreamRefusedError) -> None:
        """The backend did not process the stream: send it again, or fail with `error`."""
        self._refusal = error
        if self._retry is None:
            self._retry = self._conn.pool.start_retry(self._send_again())
        self.wake_sender()  # a replay in progress starts over

    async def _send_again(self) -> None:
        pool = self._conn.pool
        try:
            while (error := self._refusal) is not None:
                if self._replay is None or self._error is not None:
                    self.fail(error)
                    return
                if self._attempts >= MAX_REFUSALS:
                    self.fail(error)
                    return
                self._attempts += 1
                self._refusal = None
                if self._attempts > 1:
                    await asyncio.sleep(0.005 * self._attempts)  # the backend is catching up
                try:
                    conn = await pool.connection_with_slot()
                except UpstreamError:
                    self.fail(error)
                    return
                if self._error is not None:
                    return  # the caller gave up meanwhile
                bare = self._local_ended and not self.kept_body
                if not conn.reopen(self, end_stream=bare):
                    self._refusal = error
                    continue
                if not bare:
                    await self._replay_body(conn)
        except UpstreamError as exc:
            self.fail(exc)
        finally:
            self._retry = None

    async def _replay_body(self, conn: _Connection) -> None:
        """Send the kept body (and the end of the request) again on `conn`, as its windows
        allow; returns early when the stream fails or is refused again."""
        h2conn = conn.h2
        for chunk in list(self._replay or ()):
            view = memoryview(chunk)
            while view:
                if self._refusal is not None or self._error is not None:
                    return
                window = h2conn.local_flow_control_window(self.stream_id)
                if window <= 0:
                    await self._wait_window()
                    continue
                size = min(len(view), window, h2conn.max_outbound_frame_size)
                h2conn.send_data(self.stream_id, view[:size])
                view = view[size:]
                conn.write_now()
                await conn.drain()
        if self._refusal is not None or self._error is not None or not self._local_ended:
            return
        if self._end_trailers:
            conn.send_headers(self.stream_id, self._end_trailers, end_stream=True)
        else:
            h2conn.end_stream(self.stream_id)
        conn.flush()

    @property
    def request_headers(self) -> list[tuple[bytes, bytes]]:
        return self._request

    @property
    def request_ended(self) -> bool:
        return self._local_ended

    @property
    def kept_body(self) -> bool:
        """Something beyond the headers must be sent again: body bytes or trailers."""
        return bool(self._replay) or bool(self._end_trailers)

    def attach(self, conn: _Connection, stream_id: int) -> None:
        """Now carried by `conn` as `stream_id`."""
        self._conn = conn
        self.stream_id = stream_id

    # -- response ------------------------------------------------------------------------

    async def _wait(self, what: str) -> None:
        self._waiter = waiter = self._conn.loop.create_future()
        try:
            async with asyncio.timeout(self._conn.timeout):
                await waiter
        except TimeoutError:
            self.reset()
            raise UpstreamTimeoutError(f"no upstream {what} for {self._conn.timeout:g}s") from None
        finally:
            self._waiter = None

    async def response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The final status and headers (no pseudo-headers); interim 1xx responses skipped."""
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait("response headers")
        return self._head

    async def next_data(self) -> bytes:
        """The response body received so far (waiting for some), b"" at its end.

        Taking the chunk is what returns its flow-control credit to the backend.
        """
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                unacked, self._unacked = self._unacked, 0
                self._conn.acknowledge(self.stream_id, unacked)
                return data
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                if self._unacked:  # padding or empty DATA frames: credit back, nothing to hand
                    self._conn.acknowledge(self.stream_id, self._unacked)
                    self._unacked = 0
                return b""
            await self._wait("response data")

    def trailers(self) -> list[tuple[bytes, bytes]] | None:
        """The response trailers, once `next_data()` returned b"" (None when there were none).

        A trailers-only response (how gRPC reports an error without a message) is one HEADERS
        frame with END_STREAM: its `grpc-status` is among `response_head()`'s headers.
        """
        return self._trailers

    # -- events from the connection ------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.wake_sender()

    def wake_sender(self) -> None:
        waiter = self._send_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_head(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._replay = None  # the backend took it: never sent again
        try:
            self._head = response_head(headers)
        except UpstreamProtocolError as exc:
            self.fail(exc)
            self._conn.reset_stream(self.stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._conn.stream_closed(self)
        self._wake()

    def on_interim(self, headers: list[tuple[bytes, bytes]]) -> None:
        if (b":status", b"101") in headers:
            self.fail(UpstreamProtocolError("101 Switching Protocols over HTTP/2 from upstream"))
            self._conn.reset_stream(self.stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._conn.stream_closed(self)

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        if self._error is not None:
            self._conn.acknowledge(self.stream_id, flow_controlled)
            return
        if data:
            self._chunks.append(data)
        self._unacked += flow_controlled
        self._wake()

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            self._trailers = _check_field_names(headers)
        except UpstreamProtocolError as exc:
            self.fail(exc)

    def on_end(self) -> None:
        self._remote_ended = True
        if self._head is None and self._error is None:
            self._error = UpstreamProtocolError("upstream ended the stream without a response")
        if self._local_ended:
            self._conn.stream_closed(self)
        self._wake()

    def on_reset(self, error_code: int) -> None:
        if self._remote_ended and error_code == ErrorCodes.NO_ERROR and self._error is None:
            # A complete response, then "stop sending": the rest of the request is dropped.
            self._reset_quietly = True
        elif error_code == ErrorCodes.REFUSED_STREAM and self._head is None:
            self._conn.stream_closed(self)
            self.refused(StreamRefusedError("upstream refused the stream (REFUSED_STREAM)"))
            return
        else:
            self.fail(StreamResetError(f"upstream reset the stream ({error_code!s})", error_code))
        self._local_ended = self._remote_ended = True
        self._conn.stream_closed(self)
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        """The exchange cannot complete: every later call raises `error`."""
        if self._error is None and not self._reset_quietly:
            self._error = error
        self._wake()

    @property
    def complete(self) -> bool:
        """The response arrived in full (a later connection failure does not lose it)."""
        return self._remote_ended and self._error is None


class _DrainingH2Connection(h2.connection.H2Connection):
    """h2's connection, except that a GOAWAY(NO_ERROR) leaves it open for the streams the
    backend still answers (h2 would refuse every later frame, even one already in the same
    read). The pool never opens a stream on a connection that received a GOAWAY.

    This overrides h2's private frame handler: h2 is pinned, and
    tests/proxy/test_h2_upstream.py drives a real grpcio graceful shutdown through it.
    """

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return frames, events


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to the upstream and the streams open on it."""

    def __init__(self, pool: H2UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.timeout = pool.upstream_timeout
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,  # request_header_block() did (before encoding)
            normalize_outbound_headers=False,
        )
        self.h2 = _DrainingH2Connection(config=config)
        # Enforced from the first byte, not only once the backend acknowledges our SETTINGS.
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.streams: dict[int, H2UpstreamStream] = {}
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        """Done when the backend's SETTINGS arrived (then its stream limit is known)."""
        self.closed = False
        self.draining = False
        """No new streams: a GOAWAY arrived, stream ids ran out, or the pool is closing."""
        self.lost: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._flush_scheduled = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = loop.time()
        self._dispatch: dict[type[h2.events.Event], Callable[[h2.events.Event], None]] = {
            h2.events.DataReceived: self._on_data,  # type: ignore[dict-item]
            h2.events.ResponseReceived: self._on_response,  # type: ignore[dict-item]
            h2.events.StreamEnded: self._on_end,  # type: ignore[dict-item]
            h2.events.TrailersReceived: self._on_trailers,  # type: ignore[dict-item]
            h2.events.WindowUpdated: self._on_window,  # type: ignore[dict-item]
            h2.events.StreamReset: self._on_reset,  # type: ignore[dict-item]
            h2.events.InformationalResponseReceived: self._on_interim,  # type: ignore[dict-item]
            h2.events.RemoteSettingsChanged: self._on_settings,  # type: ignore[dict-item]
            h2.events.ConnectionTerminated: self._on_goaway,  # type: ignore[dict-item]
        }

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        h2conn = self.h2
        h2conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        h2conn.initiate_connection()
        h2conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.write_now()  # h2 queued the GOAWAY naming the error
            self.fail(UpstreamProtocolError(f"upstream broke HTTP/2: {exc}"))
            return
        dispatch = self._dispatch
        for event in events:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(event)
            if self.closed:
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(NotRetriedError("upstream closed the HTTP/2 connection"))
        if not self.lost.done():
            self.lost.set_result(None)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- writing -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 queued, at the end of this event-loop iteration: the frames of every
        stream written in the same iteration go out in one write (one syscall), not one each."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        """Write what h2 queued now (large bodies, so the transport's buffer limit applies)."""
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self._paused and self.transport is not None:
            if self._drain_waiter is None or self._drain_waiter.done():
                self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> None:
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            # The HPACK state may be ahead of the backend's now: the connection is unusable.
            self.fail(UpstreamProtocolError(f"cannot send headers: {exc}"))
            raise UnsafeHeadError(str(exc)) from None

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            return  # closed on both sides already, or the connection is going away
        self.flush()

    # -- streams -------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining and self.ready.done()

    @property
    def has_slot(self) -> bool:
        limit = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_CONNECTION)
        return self.usable and len(self.streams) < limit

    def _next_stream_id(self) -> int | None:
        try:
            return self.h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self.draining = True  # 2^31 streams later: the pool opens a fresh connection
            self._close_if_done()
            return None

    def _opened(self, stream: H2UpstreamStream) -> None:
        self.streams[stream.stream_id] = stream
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.flush()

    def open_stream(
        self, headers: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> H2UpstreamStream | None:
        """A new stream with its HEADERS sent, or None when this connection has no more ids."""
        stream_id = self._next_stream_id()
        if stream_id is None:
            return None
        stream = H2UpstreamStream(self, headers, end_stream=end_stream)
        self.send_headers(stream_id, headers, end_stream=end_stream)
        stream.attach(self, stream_id)
        self._opened(stream)
        return stream

    def reopen(self, stream: H2UpstreamStream, *, end_stream: bool) -> bool:
        """Send a refused stream's headers again here (its body follows unless `end_stream`);
        False when this connection has no more stream ids."""
        stream_id = self._next_stream_id()
        if stream_id is None:
            return False
        self.send_headers(stream_id, stream.request_headers, end_stream=end_stream)
        stream.attach(self, stream_id)
        self._opened(stream)
        return True

    def stream_closed(self, stream: H2UpstreamStream) -> None:
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if not self.streams:
            self._idle_since = self.loop.time()
            if self._close_if_done():
                return
            if self._idle_timer is None and not self.closed:
                self._idle_timer = self.loop.call_later(self.pool.idle_timeout, self._on_idle)
        self.pool.slot_freed()

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self.streams or self.closed:
            return
        idle = self.loop.time() - self._idle_since
        if idle >= self.pool.idle_timeout:
            self.close()
        else:
            self._idle_timer = self.loop.call_later(self.pool.idle_timeout - idle, self._on_idle)

    def _close_if_done(self) -> bool:
        if self.draining and not self.streams:
            self.close()
            return True
        return False

    # -- h2 events -----------------------------------------------------------------------

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_head(event.headers)

    def _on_interim(self, event: h2.events.InformationalResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_interim(event.headers)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            # A stream we reset or finished: its bytes still count against the connection.
            self.acknowledge(event.stream_id, event.flow_controlled_length)
            return
        stream.on_data(event.data, event.flow_controlled_length)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_trailers(event.headers)

    def _on_end(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_end()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_reset(int(event.error_code))

    def _on_window(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.wake_sender()
        else:
            for stream in self.streams.values():
                stream.wake_sender()

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        for stream in self.streams.values():
            stream.wake_sender()  # the initial window may have grown
        self.pool.slot_freed()  # the stream limit may have grown

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.draining = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id in [sid for sid in self.streams if sid > last]:
            stream = self.streams.pop(stream_id)
            stream.refused(StreamRefusedError(f"upstream sent GOAWAY before stream {stream_id}"))
        if event.error_code != ErrorCodes.NO_ERROR or not self.streams:
            code = event.error_code
            self.fail(StreamResetError(f"upstream sent GOAWAY ({code!s})", int(code or 0)))
            return
        self._close_if_done()
        self.pool.slot_freed()

    # -- ending --------------------------------------------------------------------------

    def fail(self, error: UpstreamError) -> None:
        """The connection is unusable: fail every stream that has not completed, close it."""
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            if not stream.complete:
                stream.fail(error)
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: a connect that gave up must not log it
        self.close()

    def close(self) -> None:
        """Close now (GOAWAY first when the connection is still healthy)."""
        if self.closed:
            return
        self.closed = True
        self.draining = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            try:
                self.h2.close_connection()
                self.write_now()
            except h2.exceptions.ProtocolError:
                pass  # already terminated: nothing more to say
            transport.close()
        self.pool.connection_closed(self)


class H2UpstreamPool:
    """HTTP/2 connections to one upstream, shared by every stream to it."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        upstream_timeout: float,
        max_connections: int = 8,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if upstream.scheme == "http" and ssl_context is not None:
            raise ValueError("an http:// upstream is h2c: it takes no TLS context")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.upstream = upstream
        self._ssl = ssl_context
        if upstream.scheme == "https" and ssl_context is None:
            self._ssl = client_ssl_context()
        self.connect_timeout = connect_timeout
        self.upstream_timeout = upstream_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connections: list[_Connection] = []
        """Open connections (usable, connecting, or draining their last streams)."""
        self._connecting = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._retries: set[asyncio.Task[None]] = set()
        self.connections_opened = 0
        """Connections opened over the pool's life (for tests and metrics)."""

    async def open_stream(
        self, headers: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> H2UpstreamStream:
        """Send the request headers on a stream with a free slot; see the class and module docs.

        `headers`: pseudo-headers first (:method, :scheme, :authority, :path), then lower-case
        regular headers. Raises `UnsafeHeadError` for a list that must not be sent,
        `UpstreamUnavailableError` when no connection can be made (refused, TLS without ALPN
        `h2`, closed before its SETTINGS) and `UpstreamTimeoutError` when neither a connection
        nor a free slot is there within `connect_timeout`.
        """
        headers = request_header_block(headers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            conn = await self.connection_with_slot(deadline)
            stream = conn.open_stream(headers, end_stream=end_stream)
            if stream is not None:
                return stream

    async def connection_with_slot(self, deadline: float | None = None) -> _Connection:
        """A connection with a free stream slot: pooled, new, or the first freed in time."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.connect_timeout
        while True:
            if self._closing:
                raise UpstreamUnavailableError("the upstream pool is closed")
            for conn in self.connections:
                if conn.has_slot:
                    return conn
            if self._connecting == 0 and len(self.connections) < self.max_connections:
                await self._connect(deadline)
                continue
            await self._wait_slot(loop, deadline)

    def start_retry(self, attempt: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """Run a refused stream's next attempt (awaited by `close()`)."""
        task = asyncio.get_running_loop().create_task(attempt)
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return task

    async def _wait_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"no free upstream stream within {self.connect_timeout:g}s"
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def slot_freed(self) -> None:
        """Wake every waiter to look again (a stream ended, a limit or a connection changed)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def connection_closed(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self.slot_freed()

    async def _connect(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        upstream = self.upstream
        self._connecting += 1
        conn: _Connection | None = None
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop),
                    upstream.host,
                    upstream.port,
                    ssl=self._ssl,
                    server_hostname=upstream.host if self._ssl is not None else None,
                )
                self._check_alpn(conn)
                self.connections.append(conn)
                self.connections_opened += 1
                await conn.ready
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise UpstreamTimeoutError(
                f"no HTTP/2 connection to {upstream.authority} within {self.connect_timeout:g}s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailableError(
                f"cannot connect to {upstream.authority}: {exc}"
            ) from None
        except UpstreamError as exc:
            raise UpstreamUnavailableError(
                f"HTTP/2 connection to {upstream.authority} failed: {exc}"
            ) from None
        finally:
            self._connecting -= 1
            self.slot_freed()
        if self._closing:
            conn.close()

    def _check_alpn(self, conn: _Connection) -> None:
        if self._ssl is None or conn.transport is None:
            return
        ssl_object = conn.transport.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if protocol != "h2":
            conn.close()
            raise UpstreamUnavailableError(
                f"{self.upstream.authority} did not negotiate HTTP/2 over TLS (ALPN {protocol!r})"
            )

    async def close(self) -> None:
        """Close every connection (failing open streams) and wait until they are gone."""
        self._closing = True
        conns = list(self.connections)
        for conn in conns:
            conn.fail(UpstreamUnavailableError("the upstream pool is closed"))
        self.slot_freed()
        if self._retries:
            await asyncio.wait(list(self._retries), timeout=5.0)
        lost = [conn.lost for conn in conns if not conn.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=5.0)
