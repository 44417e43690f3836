"""HTTP/2 connections on the proxied port: flow control and backpressure both ways, the
connection bound, the SETTINGS and idle deadlines, graceful shutdown, the CLI flag.

The raw h2 client comes from test_http2_attacks.py; the backends here are raw h2 servers
that send or read as their peer's windows allow, so how far each side got shows whether
the proxy buffered (it must not, beyond its bounded windows) or passed the pressure on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_peer import load_test_service, start_grpc_server
from h2.errors import ErrorCodes
from test_http2_attacks import RawClient

from nhigate.cli.main import build_parser
from nhigate.cli.proxy import settings_from_args

BIG = 8 * 1024 * 1024


@dataclass
class FlowBackend:
    """Answers every request with `BIG` bytes sent as fast as windows allow (`sent` counts),
    and reads request bodies only while `reading` is set (`received` counts)."""

    port: int = 0
    sent: int = 0
    received: int = 0
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    server: asyncio.base_events.Server | None = None


async def start_flow_backend(respond: bool = True) -> FlowBackend:
    backend = FlowBackend()
    backend.reading.set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        window_opened = asyncio.Event()
        senders: set[asyncio.Task[None]] = set()

        async def send_body(sid: int) -> None:
            conn.send_headers(sid, [(":status", "200")])
            left = BIG
            while left:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    window_opened.clear()
                    await window_opened.wait()
                    continue
                size = min(window, left)
                conn.send_data(sid, b"r" * size, end_stream=size == left)
                left -= size
                backend.sent += size
                writer.write(conn.data_to_send())
                await writer.drain()

        try:
            while True:
                await backend.reading.wait()
                data = await reader.read(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        backend.requests += 1
                        if respond:
                            task = asyncio.create_task(send_body(event.stream_id or 0))
                            senders.add(task)
                    elif isinstance(event, h2.events.DataReceived):
                        backend.received += len(event.data or b"")
                        conn.acknowledge_received_data(
                            event.flow_controlled_length or 0, event.stream_id or 0
                        )
                    elif isinstance(event, h2.events.StreamEnded) and not respond:
                        conn.send_headers(event.stream_id or 0, [(":status", "204")], True)
                    elif isinstance(event, h2.events.WindowUpdated):
                        window_opened.set()
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            for task in senders:
                task.cancel()
            writer.close()

    backend.server = await asyncio.start_server(serve, "127.0.0.1", 0)
    backend.port = backend.server.sockets[0].getsockname()[1]
    return backend


async def stop_backend(backend: FlowBackend) -> None:
    assert backend.server is not None
    backend.server.close()
    await backend.server.wait_closed()


@pytest.fixture
async def proxy_for(kit: Any, signing_key: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    started: list[tuple[Any, Any]] = []

    async def start(port: int, **kw: Any) -> Any:
        harness, runner = await kit.start_proxy(
            f"http://127.0.0.1:{port}",
            key=signing_key,
            upstream_protocol="http2",
            policy_grants=(kit.grant("all", "ci-deployer", ("/**",), frozenset({"GET", "POST"})),),
            **kw,
        )
        harness.port = int(harness.url.rsplit(":", 1)[1])
        harness.runner = runner
        started.append((harness, runner))
        return harness

    yield start
    for harness, runner in started:
        await harness.session.close()
        if not getattr(harness, "cleaned", False):
            await runner.cleanup()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_client_that_does_not_read_slows_the_backend(proxy_for: Any) -> None:
    backend = await start_flow_backend()
    try:
        proxy = await proxy_for(backend.port)
        client = await RawClient.connect(proxy.port)
        try:
            sid = client.request(b"/big", token=proxy.token())
            answer = client.answers[sid]
            # Read frames but never give credit back: the proxy may send one 64 KiB window.
            client._handle = lambda event: (  # type: ignore[method-assign]
                setattr(answer, "body", answer.body + (event.data or b""))
                if isinstance(event, h2.events.DataReceived)
                else None
            )
            await client.pump(lambda: len(answer.body) >= 65535, within=5.0)
            await asyncio.sleep(0.5)  # let the backend send whatever it still can
            assert len(answer.body) == 65535
            assert backend.sent < 1024 * 1024, backend.sent  # bounded windows, not 8 MiB
            stalled = backend.sent
            await asyncio.sleep(0.3)
            assert backend.sent == stalled
        finally:
            await client.close()
    finally:
        await stop_backend(backend)


async def test_a_backend_that_does_not_read_slows_the_client(proxy_for: Any) -> None:
    backend = await start_flow_backend(respond=False)
    try:
        proxy = await proxy_for(backend.port)
        client = await RawClient.connect(proxy.port)
        try:
            await client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 100)
            backend.reading.clear()  # from now on the backend reads nothing
            sid = client.request(b"/upload", method=b"POST", token=proxy.token(), end=False)
            sent = 0
            for _ in range(200):
                window = client.conn.local_flow_control_window(sid)
                if window == 0:
                    await client.settle(0.3)
                    if client.conn.local_flow_control_window(sid) == 0:
                        break
                    continue
                size = min(window, 16384)
                client.conn.send_data(sid, b"u" * size)
                client.flush()
                sent += size
            # The proxy credits the client only as the backend takes the bytes: the client
            # is stopped after its own window plus what the backend's socket and window hold.
            assert client.conn.local_flow_control_window(sid) == 0
            assert sent < 2 * 1024 * 1024, sent
            backend.reading.set()
            client.conn.end_stream(sid)
            client.flush()
            answer = await client.answer(sid)
            assert answer.status == 204
            await eventually(lambda: backend.received == sent)
        finally:
            await client.close()
    finally:
        await stop_backend(backend)


async def test_connections_over_the_bound_get_goaway_and_an_audit_line(proxy_for: Any) -> None:
    backend = await start_flow_backend(respond=False)
    try:
        proxy = await proxy_for(backend.port, max_connections=2)
        first = await RawClient.connect(proxy.port)
        second = await RawClient.connect(proxy.port)
        third = await RawClient.connect(proxy.port)
        try:
            await third.pump(lambda: third.goaway is not None)
            assert third.goaway is not None
            assert third.goaway.error_code == ErrorCodes.REFUSED_STREAM
            assert third.goaway.last_stream_id == 0
            records = await proxy.wait_audit(1)
            assert [r["reason"] for r in records] == ["connection_limit"]
            sid = first.request(b"/x", method=b"POST", token=proxy.token())
            assert (await first.answer(sid)).status == 204  # the others are served
        finally:
            for client in (first, second, third):
                await client.close()
    finally:
        await stop_backend(backend)


async def test_settings_never_acknowledged_is_goaway_settings_timeout(proxy_for: Any) -> None:
    backend = await start_flow_backend(respond=False)
    try:
        proxy = await proxy_for(backend.port, request_head_timeout=1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        # The preface and an empty SETTINGS frame, then silence: the proxy's SETTINGS are
        # never acknowledged.
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        data = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        await writer.wait_closed()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        events = conn.receive_data(data)
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway
        assert goaway[0].error_code == ErrorCodes.SETTINGS_TIMEOUT
        record = (await proxy.wait_audit(1))[-1]
        assert record["reason"] == "request_timeout"
        assert "SETTINGS" in record["detail"]
    finally:
        await stop_backend(backend)


async def test_shutdown_lets_open_calls_finish_and_refuses_new_ones(
    proxy_for: Any,
) -> None:
    server, port = await start_grpc_server()
    try:
        proxy = await proxy_for(port)
        pb2, pb2_grpc = load_test_service()
        md = (("authorization", f"Bearer {proxy.token()}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            stub = pb2_grpc.EchoStub(channel)
            await stub.Unary(pb2.EchoRequest(text="warm"), metadata=md)
            slow = asyncio.ensure_future(
                stub.Unary(pb2.EchoRequest(text="slow", count=800), metadata=md)
            )
            await asyncio.sleep(0.3)  # the call is at the backend
            proxy.cleaned = True
            cleanup = asyncio.create_task(proxy.runner.cleanup())
            reply = await asyncio.wait_for(slow, 5)
            assert reply.text == "slow"  # finished after GOAWAY, within the drain timeout
            await asyncio.wait_for(cleanup, 5)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Unary(pb2.EchoRequest(text="late"), metadata=md, timeout=2)
            assert raised.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
    finally:
        await server.stop(None)


def test_cli_flag_sets_the_upstream_protocol() -> None:
    parser = build_parser("proxy")
    base = ["proxy", "--upstream", "http://127.0.0.1:9000", "--resources", "/tmp"]
    assert settings_from_args(parser.parse_args(base)).upstream_protocol == "http1"
    args = parser.parse_args([*base, "--upstream-protocol", "http2"])
    assert settings_from_args(args).upstream_protocol == "http2"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--upstream-protocol", "h3"])
