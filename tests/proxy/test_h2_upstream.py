"""The HTTP/2 upstream pool (src/nhigate/proxy/h2_upstream.py, issue 17) against real peers.

Two kinds of backend, both on 127.0.0.1:
- grpcio's own asyncio server running the Echo test service (tests/proxy/grpc_peer.py), over
  h2c and over TLS, driven with real gRPC framing: messages, streaming order both ways,
  `grpc-status` trailers, a message larger than every initial window, its concurrency limit
  and its graceful shutdown;
- a raw server built on the h2 library, on a socket the test controls, for what no healthy
  backend does: GOAWAY, RST_STREAM, malformed or oversized responses, silence, a dropped
  connection, and a body pushed at a client that does not read.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_peer import (
    SERVICE,
    EchoStats,
    grpc_frame,
    grpc_messages,
    load_test_service,
    self_signed_cert,
    start_grpc_server,
)
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from nhigate.proxy.forward import (
    NotRetriedError,
    UnsafeHeadError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from nhigate.proxy.h2_upstream import (
    MAX_HEADER_LIST_SIZE,
    MAX_REFUSALS,
    REPLAY_LIMIT,
    STREAM_WINDOW,
    H2UpstreamPool,
    H2UpstreamStream,
    StreamRefusedError,
    StreamResetError,
    UpstreamProtocolError,
    client_ssl_context,
    request_header_block,
)
from nhigate.proxy.settings import Upstream

pb2, pb2_grpc = load_test_service()


def grpc_headers(port: int, method: str, scheme: str = "http") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", scheme.encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b":path", f"/{SERVICE}/{method}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


async def read_body(stream: H2UpstreamStream) -> bytes:
    parts = []
    while chunk := await stream.next_data():
        parts.append(chunk)
    return b"".join(parts)


def grpc_status(stream: H2UpstreamStream, headers: list[tuple[bytes, bytes]]) -> bytes:
    """`grpc-status` from the trailers, or from the headers of a trailers-only response."""
    fields = dict(stream.trailers() or headers)
    return fields[b"grpc-status"]


@pytest.fixture
async def grpc_backend() -> AsyncIterator[tuple[int, EchoStats]]:
    stats = EchoStats()
    server, port = await start_grpc_server(stats=stats)
    yield port, stats
    await server.stop(None)


@pytest.fixture
async def pool(grpc_backend: tuple[int, EchoStats]) -> AsyncIterator[H2UpstreamPool]:
    port, _ = grpc_backend
    pool = H2UpstreamPool(
        Upstream("http", "127.0.0.1", port),
        ssl_context=None,
        connect_timeout=5,
        upstream_timeout=10,
    )
    yield pool
    await pool.close()


async def unary(pool: H2UpstreamPool, port: int, request: Any) -> tuple[Any, bytes]:
    stream = await pool.open_stream(grpc_headers(port, "Unary"), end_stream=False)
    await stream.send_data(grpc_frame(request.SerializeToString()))
    await stream.end()
    status, headers = await stream.response_head()
    assert status == 200
    assert dict(headers)[b"content-type"] == b"application/grpc"
    body = await read_body(stream)
    (message,) = grpc_messages(body)
    return pb2.EchoReply.FromString(message), grpc_status(stream, headers)


# -- gRPC over h2c ------------------------------------------------------------------------


async def test_unary_call(pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]) -> None:
    port, stats = grpc_backend
    reply, status = await unary(pool, port, pb2.EchoRequest(text="hello", payload=b"\x00\x01"))
    assert (reply.text, reply.payload, status) == ("hello", b"\x00\x01", b"0")
    reply, status = await unary(pool, port, pb2.EchoRequest(text="again"))
    assert (reply.text, status) == ("again", b"0")
    assert stats.calls == 2
    assert pool.connections_opened == 1  # both calls on one multiplexed connection


async def test_server_streaming_keeps_order_and_trailers(
    pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]
) -> None:
    port, _ = grpc_backend
    stream = await pool.open_stream(grpc_headers(port, "ServerStream"), end_stream=False)
    await stream.send_data(grpc_frame(pb2.EchoRequest(text="n", count=50).SerializeToString()))
    await stream.end()
    status, _ = await stream.response_head()
    assert status == 200
    replies = [pb2.EchoReply.FromString(m) for m in grpc_messages(await read_body(stream))]
    assert [r.text for r in replies] == [f"n-{i}" for i in range(50)]
    assert [r.index for r in replies] == list(range(50))
    trailers = dict(stream.trailers() or [])
    assert trailers[b"grpc-status"] == b"0"


async def test_client_streaming(pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]) -> None:
    port, _ = grpc_backend
    stream = await pool.open_stream(grpc_headers(port, "ClientStream"), end_stream=False)
    for text in ("a", "b", "c"):
        await stream.send_data(
            grpc_frame(pb2.EchoRequest(text=text, payload=b"xy").SerializeToString())
        )
    await stream.end()
    status, headers = await stream.response_head()
    (message,) = grpc_messages(await read_body(stream))
    reply = pb2.EchoReply.FromString(message)
    assert (status, reply.text, reply.index) == (200, "a,b,c", 6)
    assert grpc_status(stream, headers) == b"0"


async def test_bidi_streaming_interleaves(
    pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]
) -> None:
    """Each reply is read before the next request is sent: both directions stream."""
    port, _ = grpc_backend
    stream = await pool.open_stream(grpc_headers(port, "Bidi"), end_stream=False)
    buffer = b""
    for index in range(5):
        await stream.send_data(grpc_frame(pb2.EchoRequest(text=f"m{index}").SerializeToString()))
        if index == 0:
            assert (await stream.response_head())[0] == 200
        while len(buffer) < 5 or len(buffer) < 5 + int.from_bytes(buffer[1:5], "big"):
            chunk = await stream.next_data()
            assert chunk, "the stream ended early"
            buffer += chunk
        (message,) = grpc_messages(buffer)
        buffer = b""
        reply = pb2.EchoReply.FromString(message)
        assert (reply.text, reply.index) == (f"m{index}", index)
    await stream.end()
    assert await read_body(stream) == b""
    assert dict(stream.trailers() or [])[b"grpc-status"] == b"0"


async def test_error_status_reaches_the_caller(
    pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]
) -> None:
    port, _ = grpc_backend
    stream = await pool.open_stream(grpc_headers(port, "Unary"), end_stream=False)
    request = pb2.EchoRequest(text="nope", fail_code=grpc.StatusCode.NOT_FOUND.value[0])
    await stream.send_data(grpc_frame(request.SerializeToString()))
    await stream.end()
    status, headers = await stream.response_head()
    assert status == 200
    assert await read_body(stream) == b""
    fields = dict(stream.trailers() or headers)
    assert fields[b"grpc-status"] == b"5"
    assert b"asked to fail" in fields[b"grpc-message"]


async def test_large_message_exceeds_every_window_both_ways(
    pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]
) -> None:
    port, _ = grpc_backend
    payload = bytes(range(256)) * (6 * 1024 * 4)  # 6 MiB: > 65535, > STREAM_WINDOW, > 4 MiB
    reply, status = await unary(pool, port, pb2.EchoRequest(text="big", payload=payload))
    assert status == b"0"
    assert reply.payload == payload


async def test_many_concurrent_calls_share_connections(
    pool: H2UpstreamPool, grpc_backend: tuple[int, EchoStats]
) -> None:
    port, stats = grpc_backend
    replies = await asyncio.gather(
        *(unary(pool, port, pb2.EchoRequest(text=str(i), count=20)) for i in range(60))
    )
    assert sorted(int(r.text) for r, _ in replies) == list(range(60))
    assert stats.max_active > 1
    assert pool.connections_opened == 1


# -- concurrency limit ----------------------------------------------------------------------


@pytest.mark.parametrize(("max_connections", "opened"), [(1, 1), (8, 3)])
async def test_backend_stream_limit_is_honoured(max_connections: int, opened: int) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS=2: five slow calls all complete, never more than two
    on one connection (grpcio refuses a third), queued or spread over new connections."""
    stats = EchoStats()
    server, port = await start_grpc_server(
        stats=stats, options=[("grpc.max_concurrent_streams", 2)]
    )
    pool = H2UpstreamPool(
        Upstream("http", "127.0.0.1", port),
        ssl_context=None,
        connect_timeout=5,
        upstream_timeout=10,
        max_connections=max_connections,
    )
    try:
        results = await asyncio.gather(
            *(unary(pool, port, pb2.EchoRequest(text=str(i), count=200)) for i in range(5))
        )
        assert sorted(r.text for r, _ in results) == [str(i) for i in range(5)]
        assert all(status == b"0" for _, status in results)
        assert pool.connections_opened == opened
        assert stats.max_active <= 2 * opened
        if max_connections == 1:
            assert stats.max_active == 2
    finally:
        await pool.close()
        await server.stop(None)


async def test_waiting_for_a_slot_is_bounded_by_the_connect_timeout() -> None:
    server, port = await start_grpc_server(options=[("grpc.max_concurrent_streams", 1)])
    pool = H2UpstreamPool(
        Upstream("http", "127.0.0.1", port),
        ssl_context=None,
        connect_timeout=0.3,
        upstream_timeout=10,
        max_connections=1,
    )
    try:
        held = await pool.open_stream(grpc_headers(port, "Bidi"), end_stream=False)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError):
            await pool.open_stream(grpc_headers(port, "Unary"), end_stream=False)
        assert 0.25 < time.monotonic() - started < 2
        held.reset()
        # The slot is free again: the next call goes through.
        reply, status = await unary(pool, port, pb2.EchoRequest(text="after"))
        assert (reply.text, status) == ("after", b"0")
    finally:
        await pool.close()
        await server.stop(None)


async def test_graceful_backend_shutdown_lets_in_flight_calls_finish() -> None:
    """grpcio's stop(grace) sends GOAWAY(NO_ERROR): the call in flight still completes, and
    the pool opens no new stream on that connection."""
    server, port = await start_grpc_server()
    pool = H2UpstreamPool(
        Upstream("http", "127.0.0.1", port),
        ssl_context=None,
        connect_timeout=1,
        upstream_timeout=10,
    )
    try:
        call = asyncio.create_task(unary(pool, port, pb2.EchoRequest(text="slow", count=600)))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(server.stop(5))
        reply, status = await call
        assert (reply.text, status) == ("slow", b"0")
        await stopping
        with pytest.raises(UpstreamUnavailableError):
            await pool.open_stream(grpc_headers(port, "Unary"), end_stream=True)
    finally:
        await pool.close()
        await server.stop(None)


# -- TLS ---------------------------------------------------------------------------------


async def test_tls_upstream_with_alpn_h2(tmp_path: Path) -> None:
    cert, key = self_signed_cert()
    (tmp_path / "ca.pem").write_bytes(cert)
    server, port = await start_grpc_server(tls=grpc.ssl_server_credentials([(key, cert)]))
    pool = H2UpstreamPool(
        Upstream("https", "127.0.0.1", port),
        ssl_context=client_ssl_context(str(tmp_path / "ca.pem")),
        connect_timeout=5,
        upstream_timeout=10,
    )
    try:
        stream = await pool.open_stream(grpc_headers(port, "Unary", "https"), end_stream=False)
        await stream.send_data(grpc_frame(pb2.EchoRequest(text="tls").SerializeToString()))
        await stream.end()
        status, headers = await stream.response_head()
        (message,) = grpc_messages(await read_body(stream))
        assert (status, pb2.EchoReply.FromString(message).text) == (200, "tls")
        assert grpc_status(stream, headers) == b"0"
        ssl_object = pool.connections[0].transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        assert ssl_object.selected_alpn_protocol() == "h2"
    finally:
        await pool.close()
        await server.stop(None)


async def test_tls_certificate_is_verified(tmp_path: Path) -> None:
    cert, key = self_signed_cert()
    other, _ = self_signed_cert()
    (tmp_path / "other.pem").write_bytes(other)
    server, port = await start_grpc_server(tls=grpc.ssl_server_credentials([(key, cert)]))
    pool = H2UpstreamPool(
        Upstream("https", "127.0.0.1", port),
        ssl_context=client_ssl_context(str(tmp_path / "other.pem")),
        connect_timeout=5,
        upstream_timeout=10,
    )
    try:
        with pytest.raises(UpstreamUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await pool.open_stream(grpc_headers(port, "Unary", "https"), end_stream=True)
    finally:
        await pool.close()
        await server.stop(None)


async def test_tls_without_alpn_h2_is_refused(tmp_path: Path) -> None:
    cert, key = self_signed_cert()
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    server_ssl.set_alpn_protocols(["http/1.1"])

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    pool = H2UpstreamPool(
        Upstream("https", "127.0.0.1", port),
        ssl_context=client_ssl_context(str(tmp_path / "c.pem")),
        connect_timeout=5,
        upstream_timeout=5,
    )
    try:
        with pytest.raises(UpstreamUnavailableError, match="ALPN"):
            await pool.open_stream(grpc_headers(port, "Unary", "https"), end_stream=True)
        assert pool.connections == []
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


# -- a raw h2 server for what healthy backends do not do ---------------------------------


@dataclass
class RawRequest:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    ended: bool = False
    reset: int | None = None


class RawH2Connection(asyncio.Protocol):
    """One server-side connection: h2 with outbound validation off, so it can misbehave."""

    def __init__(self, server: RawH2Server) -> None:
        self.server = server
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, RawRequest] = {}
        self.window_opened = asyncio.Event()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.append(self)
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                request = RawRequest(event.stream_id, list(event.headers))  # type: ignore[arg-type]
                self.requests[event.stream_id] = request
                self.server.on_request(self, request)
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id].body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.requests[event.stream_id].ended = True
                if self.server.on_end is not None:
                    self.server.on_end(self, self.requests[event.stream_id])
            elif isinstance(event, h2.events.StreamReset):
                self.requests[event.stream_id].reset = int(event.error_code)
            elif isinstance(event, h2.events.WindowUpdated):
                self.window_opened.set()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def respond(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        *,
        end: bool = True,
    ) -> None:
        self.h2.send_headers(
            stream_id, headers or [(b":status", b"200")], end_stream=not body and end
        )
        frame = self.h2.max_outbound_frame_size
        for offset in range(0, len(body), frame):
            last = offset + frame >= len(body)
            self.h2.send_data(stream_id, body[offset : offset + frame], end_stream=end and last)
        self.flush()

    async def push_body(self, stream_id: int, size: int) -> int:
        """Send `size` bytes as fast as the client's windows allow; returns bytes sent."""
        sent = 0
        while sent < size:
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                self.window_opened.clear()
                await self.window_opened.wait()
                continue
            chunk = min(window, self.h2.max_outbound_frame_size, size - sent)
            self.h2.send_data(stream_id, b"x" * chunk)
            sent += chunk
            self.server.pushed = sent
            self.flush()
        self.h2.send_headers(stream_id, [(b"x-done", b"yes")], end_stream=True)
        self.flush()
        return sent


@dataclass
class RawH2Server:
    on_request: Callable[[RawH2Connection, RawRequest], None]
    on_end: Callable[[RawH2Connection, RawRequest], None] | None = None
    connections: list[RawH2Connection] = field(default_factory=list)
    pushed: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: RawH2Connection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()
        await self.server.wait_closed()

    def pool(self, **kw: Any) -> H2UpstreamPool:
        values: dict[str, Any] = {"connect_timeout": 2.0, "upstream_timeout": 2.0}
        values.update(kw)
        return H2UpstreamPool(Upstream("http", "127.0.0.1", self.port), ssl_context=None, **values)

    def headers(self, path: str = "/x") -> list[tuple[bytes, bytes]]:
        return [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", f"127.0.0.1:{self.port}".encode()),
            (b":path", path.encode()),
        ]


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Any]]:
    servers: list[RawH2Server] = []
    pools: list[H2UpstreamPool] = []

    async def make(
        on_request: Callable[[RawH2Connection, RawRequest], None],
        on_end: Callable[[RawH2Connection, RawRequest], None] | None = None,
        **pool_kw: Any,
    ) -> tuple[RawH2Server, H2UpstreamPool]:
        server = RawH2Server(on_request, on_end)
        await server.start()
        servers.append(server)
        pool = server.pool(**pool_kw)
        pools.append(pool)
        return server, pool

    yield make
    for pool in pools:
        await pool.close()
    for server in servers:
        await server.close()


def answer_ok(conn: RawH2Connection, request: RawRequest) -> None:
    conn.respond(request.stream_id, body=b"ok")


async def test_connect_refused_is_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = H2UpstreamPool(
        Upstream("http", "127.0.0.1", port), ssl_context=None, connect_timeout=2, upstream_timeout=2
    )
    try:
        with pytest.raises(UpstreamUnavailableError, match="cannot connect"):
            await pool.open_stream(grpc_headers(port, "Unary"), end_stream=True)
    finally:
        await pool.close()


async def test_backend_that_accepts_and_never_speaks_times_out() -> None:
    """No SETTINGS ever arrives: the connect gives up at connect_timeout."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = H2UpstreamPool(
        Upstream("http", "127.0.0.1", port),
        ssl_context=None,
        connect_timeout=0.4,
        upstream_timeout=5,
    )
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError):
            await pool.open_stream(grpc_headers(port, "Unary"), end_stream=True)
        assert 0.35 < time.monotonic() - started < 2
        assert pool.connections == []
    finally:
        await pool.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_backend_that_never_answers_the_request_times_out(raw: Any) -> None:
    server, pool = await raw(lambda conn, request: None, upstream_timeout=0.4)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        await stream.response_head()
    assert 0.35 < time.monotonic() - started < 2
    await asyncio.sleep(0.05)
    (conn,) = server.connections
    assert conn.requests[stream.stream_id].reset == ErrorCodes.CANCEL  # the slot was given back


async def test_silence_between_chunks_times_out(raw: Any) -> None:
    def head_only(conn: RawH2Connection, request: RawRequest) -> None:
        conn.respond(request.stream_id, body=b"first", end=False)

    server, pool = await raw(head_only, upstream_timeout=0.4)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    assert (await stream.response_head())[0] == 200
    assert await stream.next_data() == b"first"
    with pytest.raises(UpstreamTimeoutError):
        await stream.next_data()


async def test_goaway_before_the_stream_is_a_safe_refusal(raw: Any) -> None:
    def go_away(conn: RawH2Connection, request: RawRequest) -> None:
        conn.h2.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=0)
        conn.flush()

    server, pool = await raw(go_away)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(StreamRefusedError) as caught:
        await stream.response_head()
    assert not isinstance(caught.value, NotRetriedError)  # safe to send again
    await asyncio.sleep(0.05)
    assert pool.connections == []  # dropped from the pool


async def test_graceful_goaway_finishes_streams_it_covers(raw: Any) -> None:
    """GOAWAY(NO_ERROR, last_stream_id=1) while streams 1 and 3 are open: 1 is still answered
    in full after the GOAWAY; 3, which the backend never processed, is sent again on a new
    connection without the caller noticing."""

    def on_request(conn: RawH2Connection, request: RawRequest) -> None:
        if conn is not server.connections[0]:
            conn.respond(request.stream_id, body=b"second connection")
        elif request.stream_id == 3:
            conn.h2.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=1)
            conn.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
            conn.respond(1, body=b"finished after goaway")

    server, pool = await raw(on_request)
    first = await pool.open_stream(server.headers(), end_stream=True)
    second = await pool.open_stream(server.headers(), end_stream=True)
    assert (first.stream_id, second.stream_id) == (1, 3)
    assert (await first.response_head())[0] == 200
    assert await read_body(first) == b"finished after goaway"
    assert (await second.response_head())[0] == 200
    assert await read_body(second) == b"second connection"
    assert second.stream_id == 1  # on the new connection
    assert pool.connections_opened == 2
    assert len(server.connections) == 2


async def test_refused_stream_is_sent_again_with_its_body(raw: Any) -> None:
    """REFUSED_STREAM after the whole request arrived: the replay carries headers, body and
    trailers again, byte for byte, on the same connection."""
    seen: list[RawRequest] = []

    def on_end(conn: RawH2Connection, request: RawRequest) -> None:
        seen.append(request)
        if len(seen) == 1:
            conn.h2.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
        else:
            conn.respond(request.stream_id, body=request.body[::-1])
        conn.flush()

    server, pool = await raw(lambda conn, request: None, on_end)
    stream = await pool.open_stream(server.headers(), end_stream=False)
    body = bytes(range(256)) * 200  # 51,200 bytes: within REPLAY_LIMIT
    await stream.send_data(body[:1000])
    await stream.send_data(body[1000:])
    await stream.end([(b"x-checksum", b"abc")])
    assert (await stream.response_head())[0] == 200
    assert await read_body(stream) == body[::-1]
    assert [r.stream_id for r in seen] == [1, 3]
    assert seen[0].body == seen[1].body == body
    assert seen[0].headers == seen[1].headers
    assert pool.connections_opened == 1


async def test_refused_stream_too_large_to_keep_reaches_the_caller(raw: Any) -> None:
    def on_end(conn: RawH2Connection, request: RawRequest) -> None:
        conn.h2.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
        conn.flush()

    server, pool = await raw(lambda conn, request: None, on_end)
    stream = await pool.open_stream(server.headers(), end_stream=False)
    await stream.send_data(b"z" * (REPLAY_LIMIT + 1))
    await stream.end()
    with pytest.raises(StreamRefusedError):
        await stream.response_head()
    assert len(server.connections[0].requests) == 1  # sent once


async def test_goaway_with_an_error_fails_streams_it_covers(raw: Any) -> None:
    def go_away(conn: RawH2Connection, request: RawRequest) -> None:
        conn.h2.close_connection(error_code=ErrorCodes.INTERNAL_ERROR, last_stream_id=1)
        conn.flush()

    server, pool = await raw(go_away)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(NotRetriedError, match="GOAWAY"):
        await stream.response_head()


async def test_reset_stream_fails_only_that_stream(raw: Any) -> None:
    def on_request(conn: RawH2Connection, request: RawRequest) -> None:
        if request.stream_id == 1:
            conn.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
            conn.flush()
        else:
            answer_ok(conn, request)

    server, pool = await raw(on_request)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(StreamResetError) as caught:
        await stream.response_head()
    assert caught.value.error_code == ErrorCodes.INTERNAL_ERROR
    assert isinstance(caught.value, NotRetriedError)  # the backend may have acted
    again = await pool.open_stream(server.headers(), end_stream=True)
    assert (await again.response_head())[0] == 200
    assert await read_body(again) == b"ok"
    assert pool.connections_opened == 1


async def test_refused_stream_is_a_safe_refusal(raw: Any) -> None:
    def refuse(conn: RawH2Connection, request: RawRequest) -> None:
        conn.h2.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
        conn.flush()

    server, pool = await raw(refuse)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(StreamRefusedError) as caught:
        await stream.response_head()
    assert not isinstance(caught.value, NotRetriedError)
    # Sent again MAX_REFUSALS times before the refusal reached the caller.
    assert len(server.connections[0].requests) == 1 + MAX_REFUSALS


async def test_reset_after_a_complete_response_keeps_it(raw: Any) -> None:
    """RFC 9113 section 8.1: a full response, then RST_STREAM(NO_ERROR) to stop the upload."""

    def answer_early(conn: RawH2Connection, request: RawRequest) -> None:
        conn.respond(request.stream_id, body=b"early")
        conn.h2.reset_stream(request.stream_id, ErrorCodes.NO_ERROR)
        conn.flush()

    server, pool = await raw(answer_early)
    stream = await pool.open_stream(server.headers(), end_stream=False)
    assert (await stream.response_head())[0] == 200
    assert await read_body(stream) == b"early"
    await stream.send_data(b"ignored")  # dropped, not an error
    await stream.end()


@pytest.mark.parametrize(
    "headers",
    [
        [(b":status", b"200"), (b"connection", b"close")],
        [(b":status", b"200"), (b"transfer-encoding", b"chunked")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b"x-a", b"1"), (b":status", b"200")],
        [(b":status", b"200"), (b"X-Upper", b"1")],
        [(b":status", b"200"), (b"x-bad", b"a\r\nb")],
    ],
    ids=["connection", "transfer-encoding", "request-pseudo", "pseudo-late", "upper", "crlf"],
)
async def test_malformed_response_is_refused_by_h2(
    raw: Any, headers: list[tuple[bytes, bytes]]
) -> None:
    """h2 treats these as a connection error: the stream fails and the connection is gone."""

    def answer(conn: RawH2Connection, request: RawRequest) -> None:
        if request.stream_id == 1 and len(server.connections) == 1:
            conn.respond(request.stream_id, headers)
        else:
            answer_ok(conn, request)

    server, pool = await raw(answer)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(UpstreamProtocolError):
        await stream.response_head()
    again = await pool.open_stream(server.headers(), end_stream=True)
    assert await read_body(again) == b"ok"
    assert pool.connections_opened == 2


@pytest.mark.parametrize(
    "headers",
    [
        [(b":status", b"20")],
        [(b":status", b"abc")],
        [(b":status", b"2000")],
        [(b":status", b"600")],
        [(b":status", b"101")],
        [(b":status", b"200"), (b"x(bad)", b"1")],
    ],
    ids=["short", "letters", "long", "600", "101", "not-a-token"],
)
async def test_malformed_response_h2_lets_through_is_refused_here(
    raw: Any, headers: list[tuple[bytes, bytes]]
) -> None:
    """What h2 does not check: only this stream is reset, the connection stays."""

    def answer(conn: RawH2Connection, request: RawRequest) -> None:
        if request.stream_id == 1:
            conn.respond(request.stream_id, headers, end=False)
        else:
            answer_ok(conn, request)

    server, pool = await raw(answer)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(UpstreamProtocolError):
        await stream.response_head()
    await asyncio.sleep(0.05)
    assert server.connections[0].requests[1].reset == ErrorCodes.PROTOCOL_ERROR
    again = await pool.open_stream(server.headers(), end_stream=True)
    assert await read_body(again) == b"ok"
    assert pool.connections_opened == 1


async def test_oversized_response_headers_are_refused(raw: Any) -> None:
    def huge(conn: RawH2Connection, request: RawRequest) -> None:
        conn.respond(
            request.stream_id, [(b":status", b"200"), (b"x-big", b"a" * MAX_HEADER_LIST_SIZE)]
        )

    server, pool = await raw(huge)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    with pytest.raises(UpstreamProtocolError, match="header"):
        await stream.response_head()


async def test_connection_lost_mid_body_is_not_retried(raw: Any) -> None:
    def vanish(conn: RawH2Connection, request: RawRequest) -> None:
        conn.respond(request.stream_id, body=b"partial", end=False)
        assert conn.transport is not None
        conn.transport.close()

    server, pool = await raw(vanish)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    assert (await stream.response_head())[0] == 200
    with pytest.raises(NotRetriedError):
        await read_body(stream)


async def test_unread_response_holds_the_backend_to_the_window(raw: Any) -> None:
    """A caller that does not read gets at most one stream window buffered; reading it all
    later returns the credit and the backend finishes (trailers included)."""
    size = 3 * 1024 * 1024
    done: list[asyncio.Task[int]] = []

    def push(conn: RawH2Connection, request: RawRequest) -> None:
        conn.respond(request.stream_id, end=False)
        done.append(asyncio.ensure_future(conn.push_body(request.stream_id, size)))

    server, pool = await raw(push, upstream_timeout=5)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    assert (await stream.response_head())[0] == 200
    await asyncio.sleep(0.3)
    assert 0 < server.pushed <= STREAM_WINDOW
    assert sum(map(len, stream._chunks)) <= STREAM_WINDOW
    body = await read_body(stream)
    assert len(body) == size
    assert await done[0] == size
    assert stream.trailers() == [(b"x-done", b"yes")]


async def test_request_body_waits_for_the_backends_window(raw: Any) -> None:
    """A body larger than the backend's window is sent as the backend hands credit back."""

    def echo_length(conn: RawH2Connection, request: RawRequest) -> None:
        pass

    server, pool = await raw(echo_length)
    stream = await pool.open_stream(server.headers(), end_stream=False)
    body = b"y" * (1024 * 1024)
    await stream.send_data(body)
    await stream.end()
    await asyncio.sleep(0.05)
    (conn,) = server.connections
    assert conn.requests[1].body == body
    assert conn.requests[1].ended


async def test_idle_connection_is_closed(raw: Any) -> None:
    server, pool = await raw(answer_ok, idle_timeout=0.2)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    assert await read_body(stream) == b"ok"
    assert len(pool.connections) == 1
    (conn,) = server.connections
    await asyncio.wait_for(conn.closed.wait(), 2)
    assert pool.connections == []


async def test_close_fails_open_streams(raw: Any) -> None:
    server, pool = await raw(lambda conn, request: None)
    stream = await pool.open_stream(server.headers(), end_stream=True)
    waiting = asyncio.create_task(stream.response_head())
    await asyncio.sleep(0.05)
    await pool.close()
    with pytest.raises(UpstreamUnavailableError):
        await waiting
    with pytest.raises(UpstreamUnavailableError):
        await pool.open_stream(server.headers(), end_stream=True)
    (conn,) = server.connections
    await asyncio.wait_for(conn.closed.wait(), 2)


@pytest.mark.parametrize(
    "extra",
    [
        [(b"connection", b"close")],
        [(b"te", b"gzip")],
        [(b"X-Upper", b"1")],
        [(b"x-a", b"1\r\nx-b: 2")],
        [(b"x-a", b" padded")],
        [(b":method", b"GET")],
        [(b"bad name", b"1")],
    ],
)
async def test_unsafe_request_headers_never_reach_the_backend(
    raw: Any, extra: list[tuple[bytes, bytes]]
) -> None:
    server, pool = await raw(answer_ok)
    with pytest.raises(UnsafeHeadError):
        await pool.open_stream(server.headers() + extra, end_stream=True)
    # Nothing was encoded: the next request on the same connection decodes fine.
    stream = await pool.open_stream(server.headers(), end_stream=True)
    assert await read_body(stream) == b"ok"
    assert [r.stream_id for c in server.connections for r in c.requests.values()] == [1]


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"POST"), (b":path", b"/"), (b":authority", b"a")],
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b""), (b":authority", b"a")],
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a"),
         (b"host", b"b")],
    ],
    ids=["no-scheme", "empty-path", "no-authority", "host-disagrees"],
)  # fmt: skip
def test_request_headers_need_sound_pseudo_headers(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(UnsafeHeadError):
        request_header_block(headers)


def test_credentials_and_per_request_values_are_never_indexed() -> None:
    token = b"eyJ" + b"a" * 300
    block = request_header_block(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"api"),
            (b"te", b"trailers"),
            (b"authorization", b"Bearer upstream-secret"),
            (b"x-request-id", b"0123456789abcdef"),
            (b"x-nhigate-assertion", token),
        ]
    )
    never = {bytes(h[0]) for h in block if isinstance(h, NeverIndexedHeaderTuple)}
    assert never == {b"authorization", b"x-request-id", b"x-nhigate-assertion"}
    assert [tuple(h) for h in block][:5] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"api"),
        (b"te", b"trailers"),
    ]


async def test_never_indexed_headers_reach_the_backend_as_sent(raw: Any) -> None:
    """The backend decodes exactly the header list the caller gave, request after request
    on one connection (HPACK state stays in step with h2's validation off)."""
    server, pool = await raw(answer_ok)
    for index in range(20):
        extra = [
            (b"authorization", b"Bearer upstream-secret"),
            (b"x-request-id", b"%016x" % index),
            (b"x-long", b"v" * (200 + index)),
            (b"x-same", b"steady"),
        ]
        stream = await pool.open_stream(server.headers() + extra, end_stream=True)
        assert await read_body(stream) == b"ok"
        (conn,) = server.connections
        received = conn.requests[stream.stream_id].headers
        assert [(bytes(n), bytes(v)) for n, v in received] == server.headers() + extra


def test_error_classes_say_what_is_safe_to_retry() -> None:
    assert issubclass(StreamRefusedError, UpstreamUnavailableError)
    assert not issubclass(StreamRefusedError, NotRetriedError)
    assert issubclass(StreamResetError, NotRetriedError)
    assert issubclass(UpstreamProtocolError, NotRetriedError)
    assert issubclass(UpstreamTimeoutError, UpstreamError)


def test_http_upstream_takes_no_tls_context() -> None:
    with pytest.raises(ValueError, match="h2c"):
        H2UpstreamPool(
            Upstream("http", "127.0.0.1", 1),
            ssl_context=client_ssl_context(),
            connect_timeout=1,
            upstream_timeout=1,
        )
