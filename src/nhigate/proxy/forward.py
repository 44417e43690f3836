"""A lean pooled HTTP/1.1 client for the one upstream the proxy forwards to.

aiohttp's `ClientSession` costs ~270 us per request on the machines we
measured; this client is an `asyncio.Protocol` per connection with the
llhttp parser (httptools), a LIFO keep-alive pool, streamed bodies in both
directions with flow control, and timeouts that never hang:

- a new connection that cannot be opened in `connect_timeout` -> `UpstreamTimeoutError`,
  refused/reset -> `UpstreamUnavailableError`;
- upstream silence longer than `read_timeout` while waiting for the response
  head or the next body chunk -> `UpstreamTimeoutError`;
- a request is sent twice only when RFC 9110 section 9.2.2 allows it: an idempotent
  request whose body was fully buffered, on a pooled connection that failed before any
  response byte arrived, is retried once on a new connection. A non-idempotent request
  (POST, PATCH, ...) is never retried once written: the upstream may have acted on it.
  Before writing one on a pooled connection, the socket is checked for an end-of-file the
  event loop has not dispatched yet, so an upstream that closed the idle connection earlier
  costs a new connection, not a 502.

Redirects are never followed: the response goes back to the caller as is.
"""

from __future__ import annotations

import asyncio
import re
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from operator import itemgetter
from typing import cast

import httptools

MAX_BUFFERED_BODY = 256 * 1024
"""Upstream bytes buffered before reading from the upstream socket pauses."""

MAX_RESPONSE_HEAD = 64 * 1024
"""Largest upstream response head (status line + headers); a larger one is a 502, not
unbounded memory (llhttp itself buffers a header line of any length)."""


class UpstreamError(Exception):
    """The upstream could not produce a complete response."""


class UpstreamUnavailableError(UpstreamError):
    """Connection refused, reset, closed early, or an unparsable response (-> 502)."""


class UpstreamTimeoutError(UpstreamError):
    """No connection or no bytes within the configured time (-> 504)."""


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 section 9.2.2: the methods a client may repeat without changing the outcome."""


class NotRetriedError(UpstreamUnavailableError):
    """A non-idempotent request failed after it was written: the upstream may have acted."""


_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding"})
_FRAMING_NAME_LENGTHS = frozenset(map(len, _FRAMING_NAMES))


class UpstreamConnection(asyncio.Protocol):
    """One upstream TCP connection carrying at most one exchange at a time."""

    __slots__ = (
        "_body",
        "_buffered",
        "_drain_waiter",
        "_head_bytes",
        "_head_done",
        "_headers",
        "_is_head",
        "_last_activity",
        "_loop",
        "_notify",
        "_paused_reading",
        "_paused_writing",
        "_poll",
        "_timeout",
        "_timer",
        "_waiter",
        "active",
        "closed",
        "error",
        "keep_alive",
        "message_done",
        "parser",
        "received_any",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.active = False
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._poll: select.poll | None = None
        self._notify: Callable[[], None] | None = None
        """`UpstreamPool.send_now`'s callback: called once, when the response head is in or
        the exchange failed (instead of waking a waiter)."""
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused_reading = False
        self._head_done = False
        self._head_bytes = 0
        self._is_head = False
        self.message_done = False
        self.received_any = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_activity = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self._close()
            return
        self.received_any = True
        self._last_activity = self._loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailableError(f"malformed upstream response: {exc}"))
            return
        if not self._head_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD:
                detail = f"upstream response head over {MAX_RESPONSE_HEAD} bytes"
                self._fail(UpstreamUnavailableError(detail))
            return
        notify = self._notify
        if notify is not None:
            # After this loop iteration's reads, not from inside this one: the answers of
            # every upstream read this iteration are then written in one burst (inline, each
            # write woke the reading peer on its own: +4 us of kernel time per request at 32
            # connections, docs/performance.md). It may begin the next exchange on this one.
            self._notify = None
            self._loop.call_soon(notify)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.active and not self.message_done and self.error is None:
            if self._head_done and not self._is_head and not self._has_framing():
                self.message_done = True  # the body was delimited by the connection close
            else:
                self._fail(UpstreamUnavailableError("upstream closed the connection"), close=False)
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _has_framing(self) -> bool:
        """The response head carries Content-Length or Transfer-Encoding."""
        return any(
            len(name) in _FRAMING_NAME_LENGTHS and name.lower() in _FRAMING_NAMES
            for name, _ in self._headers
        )

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # Runs for every response header: only collect. Whether the body is delimited by a
        # length or by the connection's close is asked only when the connection closes.
        self._headers.append((name, value))

    # The callbacks below wake the exchange's waiter inline (the body of `_wake`): they run
    # for every response, and a Python call less in each is measurable.

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are not forwarded.
            self._headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self._head_done = True
        if self._is_head:
            # httptools cannot be told the response has no body: finish here and
            # never reuse the connection.
            self.keep_alive = False
            self.message_done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.message_done:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > MAX_BUFFERED_BODY and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # the end of an interim 1xx response
        self.message_done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- exchange --------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        notify = self._notify
        if notify is not None:
            self._notify = None
            notify()

    def _fail(self, error: UpstreamError, *, close: bool = True) -> None:
        if self.error is None:
            self.error = error
        if close:
            self._close()
        self._wake()

    def _close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _on_timer(self) -> None:
        self._timer = None
        if not self.active or self.message_done or self.closed:
            return  # idle now: the next exchange arms a new timer
        idle = self._loop.time() - self._last_activity
        if idle >= self._timeout:
            self._fail(UpstreamTimeoutError(f"no upstream bytes for {self._timeout:g}s"))
        else:
            self._timer = self._loop.call_later(self._timeout - idle, self._on_timer)

    def begin(self, is_head: bool) -> None:
        """Start an exchange on this connection."""
        self._reset()
        self._is_head = is_head
        self.active = True
        self._last_activity = self._loop.time()
        if self._timer is None:
            # A timer left by an earlier exchange stays armed: when it fires it re-arms
            # itself from `_last_activity`, so a timer per exchange is not needed.
            self._timer = self._loop.call_later(self._timeout, self._on_timer)

    def socket_quiet(self) -> bool:
        """True when the socket has nothing to read: no end-of-file (the upstream closed its
        side) and no stray bytes that the event loop has not delivered yet (~1 us: one poll)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        if self._poll is None:
            raw = transport.get_extra_info("socket")
            if raw is None:
                return True  # not a socket transport: nothing to check, the exchange will tell
            self._poll = select.poll()
            self._poll.register(raw.fileno(), select.POLLIN)
        return not self._poll.poll(0)  # any event (readable, hang-up, error): unusable

    def finish(self) -> bool:
        """End the exchange; True when the connection may be reused."""
        self.active = False
        self._notify = None
        reusable = self.message_done and self.keep_alive and not self.closed and self.error is None
        if not reusable:
            self._close()
        return reusable

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._paused_writing and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
            self._drain_waiter = None
        if self.closed and self.error is None and not self.message_done:
            raise UpstreamUnavailableError("upstream closed the connection during the body")
        if self.error is not None:
            raise self.error

    def head_waiter(self) -> asyncio.Future[None] | None:
        """None once the response head is in; raises on an error or a closed connection;
        otherwise a future the next parser event completes (await it, then ask again).

        A future rather than a coroutine: the exchange awaits it directly, one coroutine
        less per request.
        """
        if self._head_done:
            return None
        if self.error is not None:
            raise self.error
        if self.closed:
            raise UpstreamUnavailableError("upstream closed the connection")
        self._waiter = waiter = self._loop.create_future()
        return waiter

    def take_buffered(self) -> bytes:
        """All body bytes received so far."""
        data = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body.clear()
        self._buffered = 0
        if self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    async def next_chunk(self) -> bytes:
        """The next body bytes; b"" at the end of the message."""
        while True:
            if self._body:
                return self.take_buffered()
            if self.message_done:
                return b""
            if self.error is not None:
                raise self.error
            if self.closed:
                raise UpstreamUnavailableError("upstream closed the connection mid-body")
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers


class UpstreamResponse:
    """A response head plus its body, complete or still streaming."""

    __slots__ = ("_conn", "_pool", "body", "headers", "status")

    def __init__(self, pool: UpstreamPool, conn: UpstreamConnection) -> None:
        self._pool = pool
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.body: bytes | None = None
        """The whole body when it had fully arrived with the head (then already released)."""
        if conn.message_done:
            self.body = conn.take_buffered()
            self._release()

    def _release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None  # type: ignore[assignment]
            self._pool.release(conn)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Stream the body; the connection returns to the pool after the last chunk."""
        if self.body is not None:
            if self.body:
                yield self.body
            return
        conn = self._conn
        try:
            while True:
                chunk = await conn.next_chunk()
                if not chunk:
                    break
                yield chunk
        finally:
            self._release()

    def close(self) -> None:
        """Give the connection back (closing it if the body was not fully read)."""
        self._release()


RequestBody = bytes | AsyncIterator[bytes] | None


class UpstreamPool:
    """Keep-alive connections to one upstream `host:port` (optionally TLS)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = 256,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: deque[UpstreamConnection] = deque()
        self._closing = False
        self.connections_opened = 0

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(loop, self._read_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                )
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"connecting to {self._host}:{self._port} took over {self._connect_timeout:g}s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailableError(
                f"cannot connect to {self._host}:{self._port}: {exc}"
            ) from None
        self.connections_opened += 1
        return protocol

    def _idle_connection(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after its exchange (kept only if reusable)."""
        if conn.finish() and not self._closing and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        elif not conn.closed:
            conn._close()

    async def request(
        self, head: bytes, body: RequestBody, *, is_head: bool, idempotent: bool = False
    ) -> UpstreamResponse:
        """Send one request (`head` is the serialised request line and headers) and read the head.

        A streamed `body` (async iterator) must already carry its chunked framing when the
        head says `Transfer-Encoding: chunked`. `idempotent` (the method is one of
        `IDEMPOTENT_METHODS`) allows one retry on a new connection when a pooled one failed
        before any response byte; otherwise a failure after writing raises `NotRetriedError`.
        """
        conn = self._pooled(idempotent)
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, head, body, is_head)
        except UpstreamUnavailableError as exc:
            if not reused:
                raise
            check_retry(exc, conn, body, idempotent)
        return await self.retry(head, body, is_head)

    async def retry(self, head: bytes, body: RequestBody, is_head: bool) -> UpstreamResponse:
        """Send the request again on a new connection (`check_retry` allowed it)."""
        conn = await self._connect()
        return await self._exchange(conn, head, body, is_head)

    def send_now(
        self, head: bytes, *, is_head: bool, idempotent: bool, notify: Callable[[], None]
    ) -> UpstreamConnection | None:
        """Start a bodyless exchange on a pooled connection without a coroutine: `notify()`
        is called once, when the response head is in (from the event loop, soon after that
        read) or the exchange failed, and then `response_of()` gives the response (or
        raises). None when no connection is idle: `await request()` instead."""
        conn = self._pooled(idempotent)
        if conn is None:
            return None
        transport = conn.transport
        assert transport is not None
        conn.begin(is_head)
        conn._notify = notify
        try:
            transport.write(head)
        except BaseException:
            conn.finish()
            raise
        return conn

    def response_of(self, conn: UpstreamConnection) -> UpstreamResponse:
        """The response of `send_now`'s exchange once it notified; raises its failure (a
        pooled connection's: see `check_retry`)."""
        try:
            waiter = conn.head_waiter()
            if waiter is not None:  # not reached: notified means the head is in or it failed
                raise UpstreamUnavailableError("upstream response head not received")
        except BaseException:
            conn.finish()
            raise
        return UpstreamResponse(self, conn)

    def _pooled(self, idempotent: bool) -> UpstreamConnection | None:
        """An idle connection to send on; a non-idempotent request only gets one whose socket
        shows no pending end-of-file (it is never sent twice)."""
        return self._idle_connection() if idempotent else self._live_idle_connection()

    def _live_idle_connection(self) -> UpstreamConnection | None:
        """An idle connection whose socket has no pending end-of-file (or data) either."""
        while (conn := self._idle_connection()) is not None:
            if conn.socket_quiet():
                return conn
            conn._close()
        return None

    async def _exchange(
        self, conn: UpstreamConnection, head: bytes, body: RequestBody, is_head: bool
    ) -> UpstreamResponse:
        transport = conn.transport
        assert transport is not None
        conn.begin(is_head)
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                transport.write(head + body)
            else:
                transport.write(head)
                async for chunk in body:
                    if conn.error is not None or conn.closed:
                        break
                    transport.write(chunk)
                    await conn.drain()
            while (waiter := conn.head_waiter()) is not None:
                await waiter
                conn._waiter = None
        except BaseException:
            conn.finish()
            raise
        return UpstreamResponse(self, conn)

    async def close(self) -> None:
        """Close every idle connection; in-flight ones close when their exchange ends."""
        self._closing = True
        while self._idle:
            self._idle.pop()._close()


def check_retry(
    exc: UpstreamUnavailableError, conn: UpstreamConnection, body: RequestBody, idempotent: bool
) -> None:
    """Return when a request that failed on a pooled connection may be sent again on a new
    one (the connection went stale while idle); otherwise raise why not."""
    if conn.received_any:
        raise exc
    if not idempotent:
        # The request left: whether the upstream read it before closing is unknowable.
        raise NotRetriedError(f"{exc} after the request was sent (not retried)") from None
    if isinstance(body, AsyncIterator):
        raise exc  # the streamed body was consumed: nothing to send again


class UnsafeHeadError(ValueError):
    """A request line or header the serialiser refuses to write (it would change the framing)."""


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 9110 `token`: the only shape of a method or a header name."""

_SAFE_NAMES: set[str] = set()
"""Header names already checked against `_TOKEN` (names repeat: one set lookup each)."""

_SAFE_NAMES_MAX = 4096

_SAFE_METHODS: set[str] = set()
"""Methods already checked against `_TOKEN` (the caller's parser chose them; bounded)."""

_SAFE_METHODS_MAX = 64

_TARGET_FORBIDDEN = re.compile("[ \t\r\n\x00]")
"""Characters that would end or split the request line."""

_name_of = itemgetter(0)


def _check_names(headers: list[tuple[str, str]]) -> None:
    for name, _ in headers:
        if name not in _SAFE_NAMES:
            if _TOKEN.fullmatch(name) is None:
                raise UnsafeHeadError(f"header name {name[:64]!r} is not an HTTP token")
            if len(_SAFE_NAMES) < _SAFE_NAMES_MAX:
                _SAFE_NAMES.add(name)


def serialise_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """The request line and header block, as bytes (header text round-trips the raw bytes).

    Raises `UnsafeHeadError` rather than write a CR, LF or NUL inside a header value, a
    header name that is not a token, or a request line that would not parse as one: the
    inbound parser and the callers already keep such bytes out, and this is the last check
    before they would reach the upstream as a second header or a second request.
    """
    if method not in _SAFE_METHODS:
        if _TOKEN.fullmatch(method) is None:
            raise UnsafeHeadError(f"method {method[:32]!r} is not an HTTP token")
        if len(_SAFE_METHODS) < _SAFE_METHODS_MAX:
            _SAFE_METHODS.add(method)
    if not target or _TARGET_FORBIDDEN.search(target) is not None:
        raise UnsafeHeadError("request target holds whitespace, a control character or nothing")
    if not headers:
        return f"{method} {target} HTTP/1.1\r\n\r\n".encode("utf-8", "surrogateescape")
    if not _SAFE_NAMES.issuperset(map(_name_of, headers)):
        _check_names(headers)
    block = "\r\n".join(map(": ".join, headers))
    separators = len(headers) - 1
    # Every CR and LF in the block must be one of the separators just inserted.
    if block.count("\n") != separators or block.count("\r") != separators or "\x00" in block:
        raise UnsafeHeadError("a header value holds CR, LF or NUL")
    return f"{method} {target} HTTP/1.1\r\n{block}\r\n\r\n".encode("utf-8", "surrogateescape")


async def chunked(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Frame a byte stream with HTTP/1.1 chunked transfer coding."""
    async for chunk in source:
        if chunk:
            yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"
