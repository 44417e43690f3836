"""The least a Python HTTP/1.1 reverse proxy does per request: the interpreter's floor.

    .venv/bin/python bench/floor_proxy.py --port P --upstream-port U

Not a proxy to use: no authentication, no policy, no audit, no timeouts, no body
streaming, no refusals. It is the same machinery nhigate's native front end is built on
(uvloop, `asyncio.Protocol`, httptools/llhttp on both sides) doing only what any
header-rewriting reverse proxy must: parse the request head into fields, write a new head
to a kept-alive upstream connection (one per client connection), parse the response head
into fields, write a new head and the body back. Everything nhigate adds per request
costs on top of this, so its CPU per request bounds from below what a Python data plane on
this stack can reach (bench/proxy_bench.py measures it as the `python-floor` case).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import cast

import httptools
import uvloop


class UpstreamConnection(asyncio.Protocol):
    """The kept-alive upstream connection of one client connection."""

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.fields = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower not in (b"connection", b"keep-alive", b"content-length", b"server"):
            self.fields.append(name + b": " + value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.client.upstream_answered()
        body = b"".join(self.body)
        status = self.parser.get_status_code()
        head = b"HTTP/1.1 %d OK\r\n%b\r\nContent-Length: %d\r\n\r\n" % (
            status,
            b"\r\n".join(self.fields),
            len(body),
        )
        self.client.respond(head + body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()


class ClientConnection(asyncio.Protocol):
    """One client connection: requests parsed, forwarded in order, answered in order."""

    def __init__(self, upstream: tuple[str, int], tasks: bool) -> None:
        self.upstream_address = upstream
        self.tasks = tasks
        self.answered: asyncio.Future[None] | None = None
        self.answer = b""
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: UpstreamConnection | None = None
        self.waiting: deque[bytes] = deque()
        self.busy = False
        self.url: list[bytes] = []
        self.fields: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = []
        self.fields = []

    def on_url(self, url: bytes) -> None:
        self.url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower not in (b"host", b"connection", b"keep-alive", b"authorization"):
            self.fields.append(name + b": " + value)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        host = b"%s:%d" % (self.upstream_address[0].encode(), self.upstream_address[1])
        self.fields.append(b"Host: " + host)
        head = b"%b %b HTTP/1.1\r\n%b\r\n\r\n" % (
            method,
            b"".join(self.url),
            b"\r\n".join(self.fields),
        )
        if self.tasks:
            asyncio.get_running_loop().create_task(self._serve(head))
            return
        self.waiting.append(head)
        self._next()

    async def _serve(self, head: bytes) -> None:
        """`--tasks`: each request served by a task awaiting its answer, as nhigate does."""
        await self._exchange(head)
        if self.transport is not None:
            self.transport.write(self.answer)

    async def _exchange(self, head: bytes) -> None:
        if self.upstream is None or self.upstream.transport is None:
            await self._connect(b"")
        assert self.upstream is not None
        assert self.upstream.transport is not None
        self.answered = asyncio.get_running_loop().create_future()
        self.upstream.transport.write(head)
        await self.answered

    def _next(self) -> None:
        if self.busy or not self.waiting:
            return
        self.busy = True
        head = self.waiting.popleft()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(head)
            return
        asyncio.get_running_loop().create_task(self._connect(head))

    async def _connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: UpstreamConnection(self), *self.upstream_address
        )
        self.upstream = upstream
        assert upstream.transport is not None
        if head:
            upstream.transport.write(head)

    def upstream_answered(self) -> None:
        if self.answered is not None:
            self.answered.set_result(None)
            self.answered = None

    def respond(self, data: bytes) -> None:
        if self.tasks:
            self.answer = data
            return
        if self.transport is not None:
            self.transport.write(data)
        self.busy = False
        self._next()

    def upstream_lost(self) -> None:
        self.upstream = None
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, upstream_port: int, tasks: bool) -> None:
    loop = asyncio.get_running_loop()
    address = ("127.0.0.1", upstream_port)
    server = await loop.create_server(lambda: ClientConnection(address, tasks), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument(
        "--tasks",
        action="store_true",
        help="serve each request with a task awaiting a future for its answer (nhigate's shape)",
    )
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port, args.tasks))


if __name__ == "__main__":
    main()
