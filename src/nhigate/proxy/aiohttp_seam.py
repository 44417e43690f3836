"""Every use of aiohttp's private API by the data plane, in one place.

The proxy relies on aiohttp internals for three things its public API does not offer:
serving requests without the router (`ProxyRunner`), auditing requests the HTTP parser
refused without an access logger on every request (`refusal_auditing_factory`) and the
client-connection limits (`HeadDeadlineConnection`, `RebuiltServer`; connections.py).
Nothing else in `nhigate` may touch an `_`-prefixed aiohttp name: each one is used here,
with why, and `tests/proxy/test_aiohttp_seam.py` pins the aiohttp version pyproject.toml
pins and exercises every hook, so an upgrade fails there first, naming what to re-check.

The private names, and why each is needed:

- `AppRunner._make_server` (overridden by `AdaptingRunner`): the only point where the
  runner's `web.Server` exists but serves nothing yet, so its handler, request factory and
  protocol factory can be replaced; startup/cleanup and graceful shutdown stay aiohttp's.
- `Application._make_request` and its `_cls` argument: the application's own request
  factory (its `client_max_size`), building a refused request as another class.
- `web_protocol.ERROR`: the placeholder message aiohttp's protocol builds a request from
  when its parser refused the bytes; the only way to tell such a request apart.
- `BaseRequest._message`: the message a request was built from, compared with `ERROR` by
  the access logger that audits refusals behind a plain `web.AppRunner` (rejects.py).
- `BaseRequest._prepare_hook` (overridden): runs once, as the (400) response of a refused
  request is prepared, which is where that refusal is audited.
- `BaseSite._server`: the asyncio server of a started site, for the port it bound (0 asks
  the kernel for one).
- `Server._kwargs`, `Server._loop`, `Server._connections`: the options and loop a server
  builds its connections with, to build a copy with other connections, and the open
  connections (the bound and the `connections_open` gauge).
- `RequestHandler._loop`, `_waiter`, `_request_count`, `_messages`, `_keepalive`,
  `_force_close`, `_keepalive_handle`, `_next_keepalive_close_time` and the overridden
  `_process_keepalive`: the connection's keep-alive timer slot, reused for the
  request-head deadline so there is no timer per request (connections.py's docstring).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web, web_protocol
from aiohttp.web_protocol import RequestHandler

PARSER_ERROR_MESSAGE: Any = getattr(web_protocol, "ERROR", None)
"""The placeholder message aiohttp builds a request from when its parser refused the bytes
(None if aiohttp stops having one: refusals are then audited by the access logger)."""

RefusalAudit = Callable[[web.BaseRequest, web.StreamResponse, float], None]
"""Writes the audit record of a request aiohttp's HTTP parser refused (`rejects.py`)."""

_REFUSED_AT: web.RequestKey[float] = web.RequestKey("nhigate_refused_at", float)


class AdaptingRunner(web.AppRunner):
    """A `web.AppRunner` whose low-level server a subclass replaces or edits in `adapt`."""

    def adapt(self, server: web.Server) -> web.Server:
        """The server to run instead of `server` (built from the app, not yet serving)."""
        return server

    async def _make_server(self) -> web.Server:
        return self.adapt(await super()._make_server())


def refusal_auditing_factory(
    app: web.Application, audit: RefusalAudit
) -> Callable[..., web.BaseRequest]:
    """The application's request factory, building parser refusals as requests that call
    `audit(request, response, seconds)` as their (400) response is prepared."""
    make_request = app._make_request
    error_message = PARSER_ERROR_MESSAGE
    loop_time = asyncio.get_running_loop().time

    class RefusedRequest(web.Request):
        """A request the HTTP parser refused: preparing its (400) response audits it."""

        async def _prepare_hook(self, response: web.StreamResponse) -> None:
            await super()._prepare_hook(response)
            audit(self, response, loop_time() - self.get(_REFUSED_AT, loop_time()))

    def request_factory(
        message: Any,
        payload: Any,
        protocol: Any,
        writer: Any,
        task: Any,
    ) -> web.BaseRequest:
        if message is error_message:
            request = make_request(message, payload, protocol, writer, task, _cls=RefusedRequest)
            request[_REFUSED_AT] = loop_time()
            return request
        return make_request(message, payload, protocol, writer, task)

    return request_factory


def refused_by_parser(request: web.BaseRequest) -> bool:
    """`request` is the placeholder for bytes aiohttp's HTTP parser refused."""
    return getattr(request, "_message", None) is PARSER_ERROR_MESSAGE


def bound_port(site: web.BaseSite) -> int:
    """The port a started site listens on (0 if it has no socket)."""
    server = site._server  # aiohttp keeps the asyncio server here
    sockets = getattr(server, "sockets", None) or ()
    for sock in sockets:
        return int(sock.getsockname()[1])
    return 0


class RebuiltServer(web.Server):
    """A copy of `server` (its handler, request factory and options, `overrides` applied)
    for a subclass whose `__call__` builds each connection's protocol."""

    def __init__(self, server: web.Server, **overrides: Any) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **{**server._kwargs, **overrides},
        )

    def connection_options(self) -> dict[str, Any]:
        """The keyword options each `RequestHandler` of this server is built with."""
        return self._kwargs

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def connection_count(self) -> int:
        """Connections open now (built by `__call__` and not yet lost)."""
        return len(self._connections)


class HeadDeadlineConnection(RequestHandler):
    """aiohttp's HTTP/1.1 connection with a request-head deadline on its keep-alive timer.

    The deadline is `head_timeout` from accepting the connection (first request) or from
    the first byte of a later request's head; aiohttp itself moves it to the idle timeout
    after every response. When it passes while the connection still waits for a complete
    head, `deadline_passed` decides what to say and the connection is closed.
    """

    __slots__ = ("_head_started", "_head_timeout", "_waiting_since")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kw: Any) -> None:
        super().__init__(manager, **kw)
        self._head_timeout = head_timeout
        self._head_started = False
        """Bytes of a head that is not complete yet have arrived."""
        self._waiting_since = 0.0

    def deadline_passed(self, *, partial: bool, first: bool, waited: float) -> None:
        """Called once the deadline passed: `partial`, part of a head arrived; `first`, no
        request has been received on this connection; `waited`, seconds since the head
        deadline started. The connection is closed after it returns."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # arms the keep-alive timer at the idle timeout
        now = self._loop.time()
        self._waiting_since = now
        self._move_deadline(now + self._head_timeout)

    def data_received(self, data: bytes) -> None:
        # Between requests (start() waits for a message) or before the first one, these
        # bytes belong to a request head; otherwise they are a body (or pipelined).
        between = self._waiter is not None or self._request_count == 0
        super().data_received(data)
        if self._messages:  # a head is complete: its request is the pipeline's now
            self._head_started = False
        elif between and data and not self._head_started:
            self._head_started = True
            if self._request_count:  # a later request: the head timeout runs from here
                now = self._loop.time()
                self._waiting_since = now
                self._move_deadline(now + self._head_timeout)

    def _move_deadline(self, when: float) -> None:
        """Close at `when` unless a head completes first (reschedules only to go earlier)."""
        self._next_keepalive_close_time = when
        # Always a timer handle (from `call_at`), in asyncio and uvloop alike.
        handle = cast(asyncio.TimerHandle | None, self._keepalive_handle)
        if handle is not None and handle.when() <= when:
            return  # fires early, sees the later deadline and re-arms itself
        if handle is not None:
            handle.cancel()
        self._keepalive_handle = self._loop.call_at(when, self._process_keepalive)

    def _process_keepalive(self) -> None:
        self._keepalive_handle = None
        if self._force_close or not self._keepalive or self.transport is None:
            return
        now = self._loop.time()
        when = self._next_keepalive_close_time
        if now < when:
            self._keepalive_handle = self._loop.call_at(when, self._process_keepalive)
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # a request is being handled; after it the deadline is set again
        self.deadline_passed(
            partial=self._head_started,
            first=self._request_count == 0,
            waited=now - self._waiting_since,
        )
        self.force_close()
