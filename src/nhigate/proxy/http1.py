"""A native HTTP/1.1 front end: an `asyncio.Protocol` on httptools (llhttp) feeding `Pipeline`.

Selected with `--http1-server native` (default `aiohttp`, `server.py`). It replaces aiohttp's
web layer on the proxied port only — the admin port stays aiohttp — and keeps what that layer
guaranteed, in our code:

- **Parser refusals** (llhttp in strict mode, plus the checks aiohttp's own C parser adds on
  top: a duplicate singleton header such as `Host` or `Content-Type`, no `Host` on HTTP/1.1,
  NUL in a value, over 128 headers, a request line or header field over 8190 bytes): answered
  `400` with `Connection: close`, audited `request_rejected` ("refused by the HTTP parser"),
  and the connection closed — nothing after a framing error is parsed, so nothing desyncs.
- **Pipelining**: requests are answered one at a time, in order. A framing error refuses
  the requests parsed with it that are not being served yet (as aiohttp refuses the whole
  batch), after the one being served. Reading pauses while a request is queued behind the
  current one, or while 256 KiB of request body wait for the pipeline; response bytes wait
  for the socket (`pause_writing`/`drain`) before the next request is served.
- **Timeouts and the bound** (connections.py's rules): one deadline per connection, from
  accept or from the first byte of a later head (`request_head_timeout`: 408 if part of a head
  arrived, else a silent close, both audited), and from the end of a response
  (`idle_timeout`: counted); over `max_connections` the canned 503 of `RefusedConnection`.
- **Expect: 100-continue** is answered only once the request is authorised; a request whose
  body was not read (refused before it) closes the connection after its answer.
- **No coroutine on the common path** (`Http1Front.serve_now`): a bodyless request with a
  cached token is authorised, sent on a pooled upstream connection and answered from that
  connection's parser callback (`UpstreamPool.send_now`). A signature to check, a body, a new
  upstream connection, a stale one to retry or a streamed response continue in a task, with
  the same refusals, deadlines and audit.
- **Not served here**: WebSocket relays and MCP endpoints. A valid handshake to a declared
  WebSocket path gets `501` (`upgrade_rejected`) and an MCP endpoint `501`
  (`request_rejected`), each audited; every other `Upgrade` is refused exactly as under
  aiohttp (400). A policy that declares either logs an error on every swap. Use the aiohttp
  front end for such services.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, cast

import httptools
import orjson
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict

from nhigate.policy import Identity, Policy, Reason
from nhigate.policy.mcp import mcp_endpoint_of
from nhigate.proxy.app import PIPELINE
from nhigate.proxy.bodies import (
    BUFFERED_BODY_LIMIT,
    UPSTREAM_FAILURES,
    check_form,
    content_length,
    limited,
    request_head,
    upstream_denial,
)
from nhigate.proxy.connections import (
    ConnectionAudit,
    ConnectionLimits,
    RefusedConnection,
    canned_response,
)
from nhigate.proxy.forward import (
    IDEMPOTENT_METHODS,
    RequestBody,
    UpstreamConnection,
    UpstreamResponse,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    check_retry,
    chunked,
)
from nhigate.proxy.headers import REQUEST_ID, response_header_lines
from nhigate.proxy.overrides import (
    form_kind,
)
from nhigate.proxy.pipeline import DenyError, Exchange, Pipeline
from nhigate.proxy.state import STATE
from nhigate.proxy.websocket import UpgradeRefusedError, declared_path, handshake_key

log = logging.getLogger(__name__)

MAX_LINE = 8190
"""Longest request target (aiohttp's `max_line_size`)."""
MAX_FIELD = 8190
"""Longest header name or value (aiohttp's `max_field_size`)."""
MAX_HEADERS = 128
"""Most header fields in one request (aiohttp's `max_headers`)."""
MAX_HEAD = (MAX_HEADERS + 1) * (2 * MAX_FIELD + 4)
"""Bytes of one unfinished head httptools may buffer before the refusal."""
BODY_HIGH_WATER = 256 * 1024
"""Request body bytes buffered before reading from the client pauses."""

SINGLETON_HEADERS = frozenset(
    {
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    }
)
"""Headers a request may carry once (aiohttp's parser refuses a second one)."""
_SINGLETONS = frozenset(name.encode("ascii") for name in SINGLETON_HEADERS)

_VERSIONS = {"1.1": HttpVersion11, "1.0": HttpVersion10}
_NO_BODY_STATUS = frozenset({204, 304})
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status] = line
    return line


class RequestBodyError(ConnectionError):
    """The client's request body could not be read (framing error or the client left)."""


class _HeadRefusedError(Exception):
    """A parser callback refused the head (`_refusal` says why, naming no request bytes)."""


class IncomingBody:
    """A request's body as it arrives, with backpressure towards the client."""

    __slots__ = ("_chunks", "_conn", "_size", "_waiter", "done", "error")

    def __init__(self, conn: Http1Connection | None) -> None:
        self._conn = conn
        """None: `NO_BODY`, the body of every request without one (nothing is ever fed)."""
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: Exception | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH_WATER and self._conn is not None:
            self._conn.pause("body")
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def chunk(self) -> bytes:
        """The next body bytes; b"" at the end."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                self._size = 0
                if self._conn is not None:
                    self._conn.resume("body")
                return data
            if self.done:
                return b""
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.chunk():
            parts.append(chunk)
        return b"".join(parts)


NO_BODY = IncomingBody(None)
NO_BODY.done = True
"""The body of a request whose head frames none: finished from the start, shared (its
`finish` and `fail` change nothing), so a bodyless request allocates no reader."""


class NativeRequest:
    """One parsed request head: a `pipeline.RequestView`, plus its framing and body."""

    __slots__ = (
        "body",
        "content_length",
        "has_body",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "remote",
        "transport",
        "version",
    )

    def __init__(
        self,
        method: str,
        raw_path: str,
        version: HttpVersion,
        headers: CIMultiDict[str],
        remote: str | None,
        transport: asyncio.Transport | None,
        body: IncomingBody,
        keep_alive: bool,
        content_length: int | None,
        has_body: bool,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.remote = remote
        self.transport = transport
        self.body = body
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.has_body = has_body


class _Refusal:
    """A parser refusal queued behind the requests before it (answered in order)."""

    __slots__ = ("detail", "status")

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


def _date() -> str:
    return email.utils.formatdate(usegmt=True)


class Http1Connection(asyncio.Protocol):
    """One client connection: llhttp parses, requests are served one at a time, in order."""

    def __init__(self, front: Http1Front) -> None:
        self._front = front
        self._limits = front.limits
        self._audit = front.audit
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._peer: str | None = None
        self._queue: deque[NativeRequest | _Refusal] = deque()
        self._busy = False
        """A request is being answered (or its answer waits for the socket to drain)."""
        self._draining = False
        self._serve_scheduled = False
        self._task: asyncio.Task[None] | None = None
        """The coroutine answering the current request, when it needs one."""
        self._reading: NativeRequest | None = None
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[str, str]] = []
        self._singletons: set[bytes] = set()
        self._content_length: int | None = None
        self._head_bytes = 0
        self._in_head = False
        self._head_started_at = 0.0
        self._requests = 0
        self._refusal: str | None = None
        self._paused: set[str] = set()
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = float("inf")
        self._waiting_since = 0.0
        self.closing = False
        self.response_started = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._front.connections.add(self)
        now = self._loop.time()
        self._waiting_since = now
        self._arm(now + self._limits.request_head_timeout)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # after a framing error nothing more is parsed
        in_head = self._in_head
        if in_head:
            self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded()
        except Exception as exc:
            self._parse_failed(exc)
        else:
            if self._in_head and self._head_bytes > MAX_HEAD:
                self._refusal = "Request header fields too large"
                self._parse_failed(_HeadRefusedError())
        if self._queue and not self._busy and not self._serve_scheduled:
            # What was parsed is answered only now, and after this loop iteration's reads:
            # then the requests of every connection read this iteration go upstream in one
            # burst (as the upstream's answers do, `UpstreamConnection.data_received`).
            self._serve_scheduled = True
            self._loop.call_soon(self._serve_soon)

    def _serve_soon(self) -> None:
        self._serve_scheduled = False
        if self._queue and not self._busy:
            self._serve_next()

    def eof_received(self) -> bool | None:
        reading = self._reading
        if reading is not None:
            reading.body.fail(RequestBodyError("client closed the connection mid-body"))
        if not self._busy and not self._queue:
            return None  # close now
        self._parser = None
        return True  # answer what is queued, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._parser = None
        self._front.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reading = self._reading
        if reading is not None:
            reading.body.fail(RequestBodyError("client went away mid-body"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("client went away"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._draining:
            self._draining = False
            self._busy = False
            self._serve_next()

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = []
        self._url_size = 0
        self._headers = []
        self._singletons = set()
        self._content_length = None
        if not self._requests:
            return  # the first head's deadline runs from the accept
        now = self._loop.time()
        self._head_started_at = now  # a later head: its deadline runs from its first byte
        if not self._busy:
            self._waiting_since = now
            self._arm(now + self._limits.request_head_timeout)

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_LINE:
            self._refusal = "Status line is too long"
            raise _HeadRefusedError
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > MAX_FIELD or len(value) > MAX_FIELD:
            self._refusal = "Got more than 8190 bytes when reading a header field"
            raise _HeadRefusedError
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            self._refusal = "Too many headers received"
            raise _HeadRefusedError
        text = value.rstrip(b" \t").decode("utf-8", "surrogateescape")
        if "\x00" in text:
            self._refusal = "Invalid header value char"
            raise _HeadRefusedError
        lower = name.lower()
        if lower in _SINGLETONS:
            seen = self._singletons
            if lower in seen:
                self._refusal = f"Duplicate '{lower[:40].decode('latin-1')}' header found"
                raise _HeadRefusedError
            seen.add(lower)
            if lower == b"content-length":
                self._content_length = int(text)  # llhttp accepted digits only
        headers.append((name.decode("utf-8", "surrogateescape"), text))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        self._in_head = False
        self._head_bytes = 0
        seen = self._singletons
        content_length = self._content_length
        chunked = b"transfer-encoding" in seen  # llhttp refused anything but a final `chunked`
        if content_length is not None and chunked:
            self._refusal = "Content-Length with Transfer-Encoding"
            raise _HeadRefusedError
        has_body = chunked or (content_length is not None and content_length > 0)
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refusal = "Unsupported HTTP version"
            raise _HeadRefusedError
        if version is HttpVersion11 and b"host" not in seen:
            self._refusal = "Missing 'Host' header in request"
            raise _HeadRefusedError
        self._requests += 1
        request = NativeRequest(
            parser.get_method().decode("ascii"),
            b"".join(self._url).decode("utf-8", "surrogateescape"),
            version,
            CIMultiDict(self._headers),
            self._peer,
            self.transport,
            IncomingBody(self) if has_body else NO_BODY,
            parser.should_keep_alive(),
            content_length,
            has_body,
        )
        self._reading = request
        self._queue.append(request)
        if len(self._queue) > 1:
            self.pause("queue")

    def on_body(self, body: bytes) -> None:
        if self._reading is not None:
            self._reading.body.feed(body)

    def on_message_complete(self) -> None:
        reading = self._reading
        if reading is not None:
            reading.body.finish()
            self._reading = None

    # -- parsing outcomes --------------------------------------------------------------------

    def _upgraded(self) -> None:
        """An `Upgrade`/CONNECT request: served like any other (it is refused or, on a
        declared path, answered 501); nothing after it is parsed, and the connection closes."""
        self._parser = None
        reading = self._reading
        if reading is not None:
            reading.body.finish()
            reading.keep_alive = False
            self._reading = None
        if self.transport is not None:
            self.transport.pause_reading()

    def _parse_failed(self, exc: Exception) -> None:
        self._parser = None
        if self.transport is not None:
            self.transport.pause_reading()
        detail = self._refusal or _parser_message(exc)
        reading = self._reading
        if reading is not None:  # the error is inside the body of a request being served
            reading.keep_alive = False
            reading.body.fail(RequestBodyError(f"invalid request body: {detail}"))
            self._reading = None
            return
        # As aiohttp: requests parsed but not yet being served are refused with the batch.
        self._queue.clear()
        self._queue.append(_Refusal(400, detail))

    # -- serving -----------------------------------------------------------------------------

    def _serve_next(self) -> None:
        """Answer what is queued, in order, one at a time: each request without a coroutine
        when `Http1Front.serve_now` can; when it cannot, `served()` continues from here."""
        queue = self._queue
        while queue:
            if self._write_paused:  # a client pipelining without reading gets no more
                self._busy = self._draining = True  # `resume_writing` continues
                return
            item = queue.popleft()
            if isinstance(item, _Refusal):
                self._refuse(item)
                return
            self.resume("queue")
            self.response_started = False
            self._busy = True
            self._disarm()
            keep = self._front.serve_now(item, self)
            if keep is None:
                return  # being answered: `served()` continues
            self._busy = False
            if not self._carry_on(keep):
                return
        self._await_next()

    def served(self, keep: bool) -> None:
        """The current request is answered (by a callback or a coroutine): go on."""
        self._busy = False
        self._task = None
        if self._carry_on(keep):
            self._serve_next()

    def spawn(self, answering: Coroutine[Any, Any, None]) -> None:
        """Answer the current request with a coroutine (it ends with `served()`)."""
        self._task = self._loop.create_task(answering)

    def _carry_on(self, keep: bool) -> bool:
        """After an answer: whether the connection serves on, else it is closed."""
        if not keep or self.closing or self.transport is None:
            self._close()
            return False
        if not self._queue and self._parser is None:  # EOF or upgrade: done
            self._close()
            return False
        return True

    def _await_next(self) -> None:
        """Nothing queued: the next head's deadline, or the idle one."""
        if self._in_head:
            self._waiting_since = self._head_started_at
            self._arm(self._head_started_at + self._limits.request_head_timeout)
        else:
            self._waiting_since = self._loop.time()
            self._arm(self._waiting_since + self._limits.idle_timeout)

    def _refuse(self, refusal: _Refusal) -> None:
        request_id = secrets.token_hex(8)
        body = orjson.dumps({"error": Reason.REQUEST_REJECTED.value, "request_id": request_id})
        self.write(
            _status_line(refusal.status)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\nX-Request-Id: %b\r\n"
            b"Connection: close\r\n\r\n%b" % (len(body), request_id.encode("ascii"), body)
        )
        self._audit.protocol_refusal(
            Reason.REQUEST_REJECTED,
            request_id,
            self._peer,
            f"refused by the HTTP parser: {refusal.detail}"[:120],
            status=refusal.status,
        )
        self._close()

    def _close(self) -> None:
        self.closing = True
        transport = self.transport
        if transport is not None:
            transport.close()

    def pause(self, why: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(why)

    def resume(self, why: str) -> None:
        if why in self._paused:
            self._paused.discard(why)
            if not self._paused and self.transport is not None and self._parser is not None:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("client went away")
        if not self._write_paused:
            return
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def idle(self) -> bool:
        """No request is being served or queued (shutdown closes such connections now)."""
        return not self._busy and not self._queue

    # -- the one deadline --------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._deadline = when
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # fires early, sees the later deadline and re-arms itself
            timer.cancel()
        self._timer = self._loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        self._deadline = float("inf")  # the timer, if any, re-arms itself for nothing

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or self._busy or self._queue:
            return  # a request is being served; after it the deadline is set again
        now = self._loop.time()
        if now < self._deadline:
            if self._deadline != float("inf"):
                self._timer = self._loop.call_at(self._deadline, self._expired)
            return
        partial = self._in_head
        if partial or not self._requests:
            request_id = secrets.token_hex(8)
            if partial:
                transport.write(canned_response(408, Reason.REQUEST_TIMEOUT, request_id))
            self._audit.head_timeout(
                request_id,
                self._peer,
                partial=partial,
                timeout=self._limits.request_head_timeout,
                waited=now - self._waiting_since,
            )
        else:
            self._audit.idle_timeout()
        self._parser = None
        self._close()


def _parser_message(exc: Exception) -> str:
    # llhttp's reason ("Invalid header value char", ...) names no request bytes.
    text = str(exc).split("\n", 1)[0].split(": b'", 1)[0]
    return text.strip().rstrip(":")[:80] or "malformed HTTP request"


class Http1Front:
    """The native HTTP/1.1 side of the proxied port, over the application's `Pipeline`."""

    def __init__(self, pipeline: Pipeline, limits: ConnectionLimits, audit: ConnectionAudit):
        self.pipeline = pipeline
        self.limits = limits
        self.audit = audit
        self.connections: set[Http1Connection] = set()
        state = pipeline.state
        self._state = state
        self._max_body = state.settings.max_body_bytes
        state.holder.subscribe(_warn_unserved)

    def protocol(self) -> asyncio.Protocol:
        """The asyncio protocol factory of the listener."""
        bound = self.limits.max_connections
        if len(self.connections) >= bound:
            return RefusedConnection(self.audit, bound)
        return Http1Connection(self)

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, let busy ones finish for `grace` seconds, then abort."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections:
            for conn in list(self.connections):
                conn.closing = True
                if conn.idle():
                    conn._close()
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()

    # -- one request -------------------------------------------------------------------------

    def serve_now(self, request: NativeRequest, conn: Http1Connection) -> bool | None:
        """Answer `request`: whether the connection may carry another one, or None while it is
        being answered (`conn.served()` then says so).

        Every stage runs here, without a coroutine, when none must wait: a bodyless request
        with a cached token on a pooled upstream connection is sent from here and answered
        from the upstream connection's callback. A signature to check, a body to read, a new
        upstream connection or a streamed response continue in a coroutine (`conn.spawn`).
        """
        pipeline = self.pipeline
        state = self._state
        state.inflight += 1
        ex = Exchange(
            request_id=pipeline.request_ids(),
            started=time.perf_counter(),
            now=state.clock(),
            method=request.method,
            path="",
        )
        try:
            path, query, authorization = pipeline.target(request, ex)
            found = pipeline.identify_now(request, ex, query, authorization)
            if found is None or request.has_body:
                rest = self._serve_rest(request, ex, found, path, query, authorization, conn)
                conn.spawn(self._finish(request, ex, conn, rest))
                return None
            policy, identity = found
            target = self._admit(request, ex, policy, identity, path) + query
            headers = self._upstream_headers(request, ex, policy)
            _frame_no_body(request.method, headers)
            head = request_head(ex.method, target, headers)
            sent = time.perf_counter()
            upstream = self._state.pool
            assert upstream is not None
            pooled = upstream.send_now(
                head,
                is_head=ex.method == "HEAD",
                idempotent=ex.method in IDEMPOTENT_METHODS,
                notify=lambda: self._answered(request, ex, conn, pooled, head, sent),
            )
            if pooled is None:  # no idle upstream connection: open one in a coroutine
                conn.spawn(
                    self._finish(request, ex, conn, self._send(request, ex, head, None, conn))
                )
            return None
        except Exception as exc:
            self._refused(request, ex, exc, conn)
        return self._settled(request, conn)

    def _settled(self, request: NativeRequest, conn: Http1Connection) -> bool:
        """`request` is answered: it is no longer in flight. Whether `conn` carries on."""
        self._state.inflight -= 1
        return self._keeps(request, conn)

    def _keeps(self, request: NativeRequest, conn: Http1Connection) -> bool:
        """Whether `conn` may carry another request after this one's answer."""
        return request.keep_alive and request.body.done and not conn.closing

    async def _finish(
        self,
        request: NativeRequest,
        ex: Exchange,
        conn: Http1Connection,
        answering: Coroutine[Any, Any, None],
    ) -> None:
        """The coroutine that answers a request `serve_now` could not finish."""
        try:
            await answering
        except Exception as exc:
            self._refused(request, ex, exc, conn)
        except BaseException:  # cancelled (the loop is stopping): no longer in flight either
            self._state.inflight -= 1
            raise
        conn.served(self._settled(request, conn))

    def _refused(
        self, request: NativeRequest, ex: Exchange, exc: Exception, conn: Http1Connection
    ) -> None:
        """Answer a stage's refusal; anything else is an internal error (fail closed)."""
        if not isinstance(exc, DenyError):
            log.error("internal error handling request %s", ex.request_id, exc_info=exc)
            exc = DenyError(Reason.INTERNAL_ERROR, type(exc).__name__)
        self._deny(request, ex, exc, conn)

    async def _serve_rest(
        self,
        request: NativeRequest,
        ex: Exchange,
        found: tuple[Policy, Identity] | None,
        path: str,
        query: str,
        authorization: str | None,
        conn: Http1Connection,
    ) -> None:
        """`serve_now` from where it had to wait: the signature check, then the body."""
        if found is None:
            found = await self.pipeline.identify_checked(request, ex, query, authorization)
        policy, identity = found
        target = self._admit(request, ex, policy, identity, path) + query
        headers = self._upstream_headers(request, ex, policy)
        body: RequestBody = None
        if request.has_body:
            body = await self._request_body(request, headers, conn)
        else:
            _frame_no_body(request.method, headers)
        await self._send(request, ex, request_head(ex.method, target, headers), body, conn)

    def _stale(
        self, request: NativeRequest, ex: Exchange, head: bytes, conn: Http1Connection
    ) -> None:
        """Send a bodyless request again on a new connection (its pooled one went stale)."""
        conn.spawn(self._finish(request, ex, conn, self._send(request, ex, head, None, conn, True)))

    def _admit(
        self, request: NativeRequest, ex: Exchange, policy: Policy, identity: Identity, path: str
    ) -> str:
        """Refuse what this front end does not serve, then authorise; the path to forward."""
        service = policy.document.service
        if "Upgrade" in request.headers:
            _refuse_upgrade(request, ex, policy, path)
        if service.mcp_endpoints and mcp_endpoint_of(service, path) is not None:
            detail = "MCP endpoints are served by --http1-server aiohttp only"
            raise DenyError(Reason.REQUEST_REJECTED, detail, status=501)
        self.pipeline.admit(policy, ex, identity, path)
        return path

    def _upstream_headers(
        self, request: NativeRequest, ex: Exchange, policy: Policy
    ) -> list[tuple[str, str]]:
        identity = ex.identity
        decision = ex.decision
        assert identity is not None
        assert decision is not None
        length = request.content_length
        if length is not None and length > self._max_body:
            raise DenyError(Reason.BODY_TOO_LARGE, f"Content-Length {length} > {self._max_body}")
        return self.pipeline.upstream_headers(
            request, ex, policy.document.service, identity, decision
        )

    async def _request_body(
        self, request: NativeRequest, headers: list[tuple[str, str]], conn: Http1Connection
    ) -> RequestBody:
        """The body to send (whole when small, else streamed), its framing added to
        `headers`; the caller is told to send it only now, authorised."""
        if (
            not request.body.done
            and "Expect" in request.headers
            and request.version >= HttpVersion11
        ):
            # Only now, authorised: the caller may send its body (`target` checked the value).
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        form = form_kind(request.headers.get("Content-Type", ""))
        length = request.content_length
        if length is None:
            headers.append(("Transfer-Encoding", "chunked"))
            return chunked(limited(request.body.chunk, self._max_body, form))
        headers.append(("Content-Length", str(length)))
        if length > BUFFERED_BODY_LIMIT:
            return limited(request.body.chunk, self._max_body, form)
        try:
            body = await request.body.read()
        except RequestBodyError as exc:
            raise DenyError(
                Reason.REQUEST_REJECTED, f"reading the request body failed: {exc}"
            ) from None
        if form is not None:
            check_form(body, form)
        return body

    async def _send(
        self,
        request: NativeRequest,
        ex: Exchange,
        head: bytes,
        body: RequestBody,
        conn: Http1Connection,
        fresh: bool = False,
    ) -> None:
        """Send the request upstream (on a new connection when none is idle, or `fresh`:
        `check_retry` allowed a second try) and answer."""
        pool = self._state.pool
        assert pool is not None
        sent = time.perf_counter()
        is_head = ex.method == "HEAD"
        try:
            if fresh:
                upstream = await pool.retry(head, body, is_head)
            else:
                idempotent = ex.method in IDEMPOTENT_METHODS
                upstream = await pool.request(head, body, is_head=is_head, idempotent=idempotent)
        except UPSTREAM_FAILURES as exc:
            raise upstream_denial(exc, self._max_body) from None
        pending = self._respond(request, ex, upstream, conn, sent)
        if pending is not None:  # the body is still coming: stream it
            await self._stream(request, ex, upstream, conn, pending)

    def _respond(
        self,
        request: NativeRequest,
        ex: Exchange,
        upstream: UpstreamResponse,
        conn: Http1Connection,
        sent: float,
    ) -> list[bytes] | None:
        """`_respond_now`, once the upstream's time is observed."""
        self._state.metrics.upstream_duration.observe(time.perf_counter() - sent)
        return self._respond_now(request, ex, upstream, conn)

    def _answered(
        self,
        request: NativeRequest,
        ex: Exchange,
        conn: Http1Connection,
        pooled: UpstreamConnection | None,
        head: bytes,
        sent: float,
    ) -> None:
        """`send_now`'s callback: the response head is in, or the exchange failed."""
        pool = self._state.pool
        assert pool is not None
        assert pooled is not None
        try:
            try:
                upstream = pool.response_of(pooled)
            except UpstreamUnavailableError as exc:
                check_retry(exc, pooled, None, ex.method in IDEMPOTENT_METHODS)
                self._stale(request, ex, head, conn)
                return
            pending = self._respond(request, ex, upstream, conn, sent)
            if pending is not None:  # the body is still coming: stream it
                streaming = self._stream(request, ex, upstream, conn, pending)
                conn.spawn(self._finish(request, ex, conn, streaming))
                return
        except UPSTREAM_FAILURES as exc:
            self._refused(request, ex, upstream_denial(exc, self._max_body), conn)
        except Exception as exc:
            self._refused(request, ex, exc, conn)
        conn.served(self._settled(request, conn))

    def _respond_now(
        self,
        request: NativeRequest,
        ex: Exchange,
        upstream: UpstreamResponse,
        conn: Http1Connection,
    ) -> list[bytes] | None:
        """Answer a response that has no body to stream (no coroutine); else the head so far."""
        status = upstream.status
        close = not self._keeps(request, conn)
        head = [_status_line(status), response_header_lines(upstream.headers)]
        no_body = status in _NO_BODY_STATUS or status < 200
        if ex.method == "HEAD" or no_body:
            length = content_length(upstream.headers)
            if length is not None and status != 204 and status >= 200:
                head.append(b"Content-Length: %d\r\n" % length)
            if close:
                head.append(b"Connection: close\r\n")
            head.append(b"\r\n")
            conn.write(b"".join(head))
            upstream.close()
            self.pipeline.audit_allowed(ex, status)
            return None
        if upstream.body is not None:  # the whole body arrived with the head
            body = upstream.body
            head.append(b"Content-Length: %d\r\n" % len(body))
            if close:
                head.append(b"Connection: close\r\n")
            head.append(b"\r\n")
            head.append(body)
            conn.write(b"".join(head))
            self.pipeline.audit_allowed(ex, status)
            return None
        return head

    async def _stream(
        self,
        request: NativeRequest,
        ex: Exchange,
        upstream: UpstreamResponse,
        conn: Http1Connection,
        head: list[bytes],
    ) -> None:
        """Stream the upstream body to the caller: its length, else chunked (HTTP/1.0: until
        the close)."""
        status = upstream.status
        close = not self._keeps(request, conn)
        length = content_length(upstream.headers)
        framed = length is not None or request.version >= HttpVersion11
        if length is not None:
            head.append(b"Content-Length: %d\r\n" % length)
        elif framed:
            head.append(b"Transfer-Encoding: chunked\r\n")
        if close or not framed:
            head.append(b"Connection: close\r\n")
            request.keep_alive = False
        head.append(b"\r\n")
        detail: str | None = None
        conn.response_started = True
        try:
            conn.write(b"".join(head))
            async for chunk in upstream.iter_chunks():
                if length is None and framed:
                    conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    conn.write(chunk)
                await conn.drain()
            if length is None and framed:
                conn.write(b"0\r\n\r\n")
        except (UpstreamUnavailableError, UpstreamTimeoutError) as exc:
            detail = f"upstream failed mid-body: {exc}"
            conn.abort()
        except ConnectionError as exc:
            detail = f"client went away mid-body: {type(exc).__name__}"
            conn.abort()
        finally:
            upstream.close()
        self.pipeline.audit_allowed(ex, status, detail)

    def _deny(
        self, request: NativeRequest, ex: Exchange, denied: DenyError, conn: Http1Connection
    ) -> None:
        reason = denied.reason
        status = denied.status
        grant = ex.decision.grant if ex.decision is not None else None
        self.pipeline.record(ex, "deny", reason, grant, status, denied.detail)
        if conn.response_started:  # the head is out: the answer cannot change any more
            conn.abort()
            return
        body = denied.body
        if body is None:
            body = orjson.dumps({"error": reason.value, "request_id": ex.request_id})
        close = not self._keeps(request, conn)
        head = [
            _status_line(status),
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
            f"{REQUEST_ID}: {ex.request_id}\r\nDate: {_date()}\r\n".encode("ascii"),
        ]
        if denied.extra_headers:
            for name, value in denied.extra_headers.items():
                head.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if request.method != "HEAD":
            head.append(body)
        conn.write(b"".join(head))


_EMPTY_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _frame_no_body(method: str, headers: list[tuple[str, str]]) -> None:
    """A bodyless request whose method expects a body says its length is 0."""
    if method in _EMPTY_BODY_METHODS:
        headers.append(("Content-Length", "0"))


def _refuse_upgrade(request: NativeRequest, ex: Exchange, policy: Policy, path: str) -> None:
    """Every `Upgrade` is refused: as the aiohttp front end refuses it, or, when that front end
    would relay it, with 501 (this front end relays no WebSocket)."""
    service = policy.document.service
    try:
        handshake_key(request.method, request.version == HttpVersion11, request.headers)
    except UpgradeRefusedError as exc:
        raise DenyError(Reason.UPGRADE_REJECTED, str(exc)) from None
    if not declared_path(service.websocket_paths, path):
        raise DenyError(Reason.UPGRADE_REJECTED, "path is not a declared WebSocket path")
    if service.mcp_endpoints and mcp_endpoint_of(service, path) is not None:
        raise DenyError(Reason.UPGRADE_REJECTED, "WebSocket on an MCP endpoint")
    if ex.override is not None:
        raise DenyError(Reason.UPGRADE_REJECTED, "override on a WebSocket handshake")
    detail = "WebSocket relays are served by --http1-server aiohttp only"
    raise DenyError(Reason.UPGRADE_REJECTED, detail, status=501)


def _warn_unserved(policy: Policy) -> None:
    service = policy.document.service
    if service.websocket_paths or service.mcp_endpoints:
        log.error(
            "policy declares WebSocket paths or MCP endpoints, which --http1-server native "
            "answers with 501: run this service with --http1-server aiohttp"
        )


class NativeRunner:
    """Serves a `create_app()` application's proxied port with `Http1Front` (no aiohttp web
    layer): the application's startup, shutdown and cleanup contexts run as under
    `ProxyRunner`; `cleanup()` stops accepting, drains for `shutdown_timeout`, then closes."""

    def __init__(self, app: web.Application, *, shutdown_timeout: float = 15.0) -> None:
        self.app = app
        self._shutdown_timeout = shutdown_timeout
        self._listener: asyncio.Server | None = None
        self.front: Http1Front | None = None
        self.port = 0

    async def setup(self) -> None:
        app = self.app
        app.on_startup.freeze()  # as `web.AppRunner`: startup contexts may add shutdown hooks
        await app.startup()
        app.freeze()
        state = app[STATE]
        limits, audit = state.connection_rules()
        front = Http1Front(app[PIPELINE], limits, audit)
        state.metrics.connections_open.set_function(lambda: len(front.connections))
        self.front = front

    async def start(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
        reuse_port: bool | None = None,
    ) -> int:
        """Listen on `host:port`; the port bound."""
        front = self.front
        assert front is not None, "setup() first"
        self._listener = await asyncio.get_running_loop().create_server(
            front.protocol,
            host,
            port,
            ssl=ssl_context,
            backlog=backlog,
            reuse_port=reuse_port,
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def cleanup(self) -> None:
        server = self._listener
        if server is not None:
            server.close()
            self._listener = None
        await self.app.shutdown()
        if self.front is not None:
            await self.front.shutdown(self._shutdown_timeout)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        await self.app.cleanup()
