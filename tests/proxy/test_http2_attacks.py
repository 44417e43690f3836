"""HTTP/2 on the proxied port, driven with the `h2` library as a raw client on a socket.

Every refusal is checked twice: what the client receives (a status, a trailers-only gRPC
answer, RST_STREAM or GOAWAY) and the audit line. Nothing refused may reach the backend:
the backend here is a raw HTTP/2 server that records every stream it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from nhigate.policy import normalise_path
from nhigate.proxy.http2 import HARD_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE, RESET_BUDGET

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


# -- a raw HTTP/2 backend that records what reaches it -----------------------------------


@dataclass
class Backend:
    port: int = 0
    streams: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    bodies: dict[int, bytes] = field(default_factory=dict)
    server: asyncio.base_events.Server | None = None
    grpc: bool = False

    def headers_of(self, index: int = -1) -> dict[bytes, bytes]:
        return dict(self.streams[index])


async def start_backend(grpc: bool = False) -> Backend:
    backend = Backend(grpc=grpc)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        backend.streams.append(list(event.headers or ()))
                        backend.bodies[event.stream_id or 0] = b""
                    elif isinstance(event, h2.events.DataReceived):
                        sid = event.stream_id or 0
                        backend.bodies[sid] = backend.bodies.get(sid, b"") + (event.data or b"")
                        conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
                    elif isinstance(event, h2.events.StreamEnded):
                        sid = event.stream_id or 0
                        body = b"echo:" + backend.bodies.get(sid, b"")
                        if backend.grpc:
                            conn.send_headers(sid, [(b":status", b"200"), *GRPC[:1]])
                            conn.send_data(sid, b"\0\0\0\0\0")
                            conn.send_headers(
                                sid, [(b"grpc-status", b"0"), (b"x-trailer", b"kept")], True
                            )
                        else:
                            conn.send_headers(
                                sid,
                                [
                                    (b":status", b"200"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close"),
                                ],
                            )
                            conn.send_data(sid, body, end_stream=True)
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    backend.server = await asyncio.start_server(serve, "127.0.0.1", 0)
    backend.port = backend.server.sockets[0].getsockname()[1]
    return backend


# -- a raw HTTP/2 client -----------------------------------------------------------------


@dataclass
class Answer:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def field(self, name: bytes) -> bytes | None:
        return dict(self.headers + self.trailers).get(name)


class RawClient:
    """An h2 client connection on a socket, reading events as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False

    @classmethod
    async def connect(cls, port: int, *, validate: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.config.validate_outbound_headers = validate
        client.conn.config.normalize_outbound_headers = validate
        client.conn.initiate_connection()
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def request(
        self,
        path: bytes = b"/v1/items/1",
        *,
        method: bytes = b"GET",
        extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
        token: str | None = None,
        end: bool = True,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        if headers is None:
            headers = [
                (b":method", method),
                (b":scheme", b"http"),
                (b":authority", b"proxy.test"),
                (b":path", path),
            ]
            if token is not None:
                headers.append((b"authorization", f"Bearer {token}".encode()))
            headers.extend(extra)
        self.conn.send_headers(sid, headers, end_stream=end)
        self.answers[sid] = Answer()
        self.flush()
        return sid

    async def pump(self, until: Any, within: float = 5.0) -> None:
        """Read and handle events until `until()` is true (or the connection closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not until() and not self.closed:
            remaining = deadline - loop.time()
            assert remaining > 0, "timed out waiting for the proxy"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                break
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
            for event in events:
                self._handle(event)
            self.flush()

    async def settle(self, seconds: float) -> None:
        """Handle whatever arrives within `seconds` (no condition, no failure)."""
        with contextlib.suppress(TimeoutError, AssertionError):
            await self.pump(lambda: False, within=seconds)

    def _handle(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None) or 0
        answer = self.answers.get(sid)
        if isinstance(event, h2.events.ResponseReceived) and answer:
            answer.headers = list(event.headers or ())
        elif isinstance(event, h2.events.TrailersReceived) and answer:
            answer.trailers = list(event.headers or ())
        elif isinstance(event, h2.events.DataReceived) and answer:
            answer.body += event.data or b""
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
        elif isinstance(event, h2.events.StreamEnded) and answer:
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset) and answer:
            answer.reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    async def answer(self, sid: int) -> Answer:
        answer = self.answers[sid]
        await self.pump(lambda: answer.ended or answer.reset is not None)
        return answer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    backend = await start_backend()
    yield backend
    assert backend.server is not None
    backend.server.close()
    await backend.server.wait_closed()


@pytest.fixture
async def h2proxy(kit: Any, backend: Backend, signing_key: Any) -> AsyncIterator[Any]:
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{backend.port}",
        key=signing_key,
        upstream_protocol="http2",
        request_head_timeout=2.0,
        idle_timeout=2.0,
    )
    harness.port = int(harness.url.rsplit(":", 1)[1])
    yield harness
    await harness.session.close()
    await runner.cleanup()


@pytest.fixture
async def client(h2proxy: Any) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(h2proxy.port)
    yield client
    await client.close()


async def last_audit(harness: Any, count: int = 1) -> dict[str, Any]:
    records = await harness.wait_audit(count)
    assert len(records) >= count, records
    return records[-1]


# -- forwarding and ordinary refusals ----------------------------------------------------


async def test_allowed_request_is_forwarded_with_identity_and_no_credential(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    sid = client.request(
        extra=[(b"x-nhigate-subject", b"forged"), (b"x-request-id", b"forged"), (b"x-ok", b"1")],
        token=h2proxy.token(),
    )
    answer = await client.answer(sid)
    assert answer.status == 200
    assert answer.body == b"echo:"
    assert answer.field(b"connection") is None  # hop-by-hop response headers dropped
    seen = backend.headers_of()
    assert seen[b":path"] == b"/v1/items/1"
    assert seen[b":authority"] == f"127.0.0.1:{backend.port}".encode()
    assert b"authorization" not in seen
    assert seen[b"x-nhigate-subject"] == b"ci-deployer"
    assert [v for k, v in backend.streams[-1] if k == b"x-nhigate-subject"] == [b"ci-deployer"]
    assert seen[b"x-request-id"] == answer.field(b"x-request-id")
    assert seen[b"x-ok"] == b"1"
    record = await last_audit(h2proxy)
    assert record["decision"] == "allow"
    assert record["status"] == 200
    assert record["path"] == "/v1/items/1"


async def test_request_body_reaches_the_backend(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    sid = client.request(method=b"POST", token=h2proxy.token(), end=False)
    client.conn.send_data(sid, b"hello", end_stream=True)
    client.flush()
    answer = await client.answer(sid)
    assert answer.status == 200
    assert answer.body == b"echo:hello"


async def test_no_token_is_401_json_and_never_reaches_backend(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    sid = client.request()
    answer = await client.answer(sid)
    assert answer.status == 401
    assert b"credential_missing" in answer.body
    assert answer.field(b"www-authenticate") is not None
    assert backend.streams == []
    record = await last_audit(h2proxy)
    assert (record["decision"], record["reason"], record["status"]) == (
        "deny",
        "credential_missing",
        401,
    )


async def test_grpc_denials_are_trailers_only(
    h2proxy: Any, client: RawClient, backend: Backend, kit: Any
) -> None:
    h2proxy.set_policy(
        (
            kit.grant(
                "echo/unary",
                "ci-deployer",
                ("/pkg.Echo/Unary",),
                frozenset({"POST"}),
                rate_limit=kit.RateLimit(requests_per_second=0.001, burst=1),
            ),
        )
    )
    cases = [
        (None, b"/pkg.Echo/Unary", b"16", "credential_missing"),
        (h2proxy.token(), b"/pkg.Echo/Other", b"7", "no_matching_grant"),
        (h2proxy.token(), b"/pkg.Echo/Unary", None, "allowed"),
        (h2proxy.token(), b"/pkg.Echo/Unary", b"8", "rate_limited"),
    ]
    backend.grpc = True
    for index, (token, path, code, reason) in enumerate(cases, start=1):
        sid = client.request(path, method=b"POST", extra=GRPC, token=token)
        answer = await client.answer(sid)
        assert answer.status == 200
        record = await last_audit(h2proxy, index)
        assert record["reason"] == reason
        assert record["grpc_service"] == "pkg.Echo"
        assert record["grpc_method"] == path.rsplit(b"/", 1)[1].decode()
        if code is None:
            assert answer.trailers
            assert dict(answer.trailers)[b"grpc-status"] == b"0"
            assert dict(answer.trailers)[b"x-trailer"] == b"kept"
            assert record["grpc_status"] == 0
            continue
        assert answer.trailers == []  # trailers-only: one HEADERS frame with END_STREAM
        assert answer.field(b"content-type") == b"application/grpc"
        assert answer.field(b"grpc-status") == code
        assert reason.encode() in (answer.field(b"grpc-message") or b"")
        assert record["grpc_status"] == int(code)
    assert len(backend.streams) == 1


async def test_http1_on_an_http2_port_is_505_and_h2c_upgrade_never_switches(
    h2proxy: Any, backend: Backend
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", h2proxy.port)
    writer.write(
        b"GET /v1/items/1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 505 ")
    assert b"101" not in response.split(b"\r\n", 1)[0]
    record = await last_audit(h2proxy)
    assert (record["reason"], record["status"], record["method"]) == (
        "request_rejected",
        505,
        "GET",
    )
    assert backend.streams == []


# -- header-block attacks ------------------------------------------------------------------

BASE = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"proxy.test"),
    (b":path", b"/v1/items/1"),
]

MALFORMED = {
    "missing :path": BASE[:3],
    "missing :method": BASE[1:],
    "duplicate :path": [*BASE, (b":path", b"/admin")],
    "unknown pseudo-header": [*BASE, (b":evil", b"1")],
    "pseudo-header after a regular one": [*BASE[:3], (b"x-a", b"1"), BASE[3]],
    "upper-case name": [*BASE, (b"X-Upper", b"1")],
    "authority and host disagree": [*BASE, (b"host", b"other.test")],
    "two host headers": [*BASE[:2], BASE[3], (b"host", b"a"), (b"host", b"b")],
    "connection": [*BASE, (b"connection", b"close")],
    "keep-alive": [*BASE, (b"keep-alive", b"timeout=5")],
    "proxy-connection": [*BASE, (b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [*BASE, (b"transfer-encoding", b"chunked")],
    "upgrade": [*BASE, (b"upgrade", b"h2c")],
    "te other than trailers": [*BASE, (b"te", b"gzip")],
    "CR in a value": [*BASE, (b"x-a", b"a\r\nx-nhigate-subject: admin")],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_header_blocks_get_400_and_audit(
    case: str, h2proxy: Any, backend: Backend
) -> None:
    client = await RawClient.connect(h2proxy.port, validate=False)
    try:
        headers = [*MALFORMED[case], (b"authorization", f"Bearer {h2proxy.token()}".encode())]
        sid = client.request(headers=headers)
        answer = await client.answer(sid)
        assert answer.status == 400
        record = await last_audit(h2proxy)
        assert (record["reason"], record["status"]) == ("request_rejected", 400)
        assert "malformed HTTP/2 request" in record["detail"]
        # The connection survives a malformed stream: a good request still works.
        good = client.request(token=h2proxy.token())
        assert (await client.answer(good)).status == 200
    finally:
        await client.close()
    assert len(backend.streams) == 1  # only the good request


@pytest.mark.parametrize("acked", [False, True])
async def test_oversized_header_list_is_431(
    acked: bool, h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    if acked:  # h2 applies the advertised bound only once the client acknowledged it
        await client.pump(lambda: client.conn.remote_settings.max_header_list_size is not None)
        await client.settle(0.2)
    big = [(f"x-big-{i}".encode(), b"v" * 4000) for i in range(MAX_HEADER_LIST_SIZE // 4000)]
    sid = client.request(extra=big, token=h2proxy.token())
    answer = await client.answer(sid)
    assert answer.status == 431
    record = await last_audit(h2proxy)
    assert (record["reason"], record["status"]) == ("request_rejected", 431)
    assert backend.streams == []
    good = client.request(token=h2proxy.token())  # the connection stays usable
    assert (await client.answer(good)).status == 200


async def test_header_list_over_the_hard_bound_ends_the_connection(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    huge = [(f"x-huge-{i}".encode(), b"v" * 8000) for i in range(HARD_HEADER_LIST_SIZE // 8000 + 1)]
    client.request(extra=huge, token=h2proxy.token())
    await client.pump(lambda: client.goaway is not None)
    assert client.goaway is not None
    record = await last_audit(h2proxy)
    assert record["reason"] == "request_rejected"
    assert "header" in record["detail"].lower()
    assert backend.streams == []


async def test_continuation_flood_ends_the_connection(h2proxy: Any, backend: Backend) -> None:
    client = await RawClient.connect(h2proxy.port, validate=False)
    try:
        block = client.conn.encoder.encode(BASE)
        first = HeadersFrame(1)
        first.data = block
        first.flags.add("END_STREAM")
        frames = [first.serialize()]
        for _ in range(100):  # never END_HEADERS
            cont = ContinuationFrame(1)
            cont.data = b"\x40\x01a\x01b"  # a literal header, again and again
            frames.append(cont.serialize())
        client.writer.write(b"".join(frames))
        await client.pump(lambda: client.goaway is not None)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        record = await last_audit(h2proxy)
        assert record["reason"] == "request_rejected"
        assert "continuation" in record["detail"].lower()
    finally:
        await client.close()
    assert backend.streams == []


async def test_rapid_reset_gets_goaway_enhance_your_calm(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    # Twice the budget: a reset that arrives after the proxy already answered the stream
    # (a 401 here) is of a closed stream, which h2 does not report.
    for _ in range(2 * RESET_BUDGET):
        sid = client.request(token="x", end=False)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
    client.flush()
    await client.pump(lambda: client.goaway is not None, within=10.0)
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    records = await h2proxy.wait_audit(1)
    rapid = [r for r in records if "rapid reset" in (r.get("detail") or "")]
    assert len(rapid) == 1
    assert rapid[0]["decision"] == "deny"


async def test_too_many_concurrent_streams_end_the_connection(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    await client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 100)
    # Raw HEADERS frames: the client's h2 would refuse to open more than the proxy allows.
    frames = []
    for index in range(101):
        frame = HeadersFrame(2 * index + 1)
        frame.data = client.conn.encoder.encode(BASE)
        frame.flags.add("END_HEADERS")  # no END_STREAM: every stream stays open
        frames.append(frame.serialize())
    client.writer.write(b"".join(frames))
    await client.pump(lambda: client.goaway is not None)
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    records = await h2proxy.wait_audit(1)
    refusals = [r for r in records if "max inbound streams" in (r.get("detail") or "").lower()]
    assert len(refusals) == 1
    assert backend.streams == []  # none had a token


# The atoms tests/hardening/test_differential_paths.py builds its targets from.
ATOMS = (
    *("..", ".", "%2e", "%2E", "%2e%2e", ".%2e", "%2E.", "%252e", "%252e%252e", "%25", ""),
    *("%2f", "%2F", "%5c", "%5C", "\\", "..\\", ";", "..;", ";x=..", "%3B", "%00", "\x00"),
    *("%C0%AE", "%c0%ae%c0%ae", "%E0%80%AE", "%C0%AF", "%EF%BC%8F", "\u00e9", "\u2215"),
    *("%E2%80%AE", "\uff41\uff44\uff4d\uff49\uff4e", "admin", "ADMIN", "Items", "ITEMS"),
    *("items", "v1", "V1", "secret", "%41dmin", "%61dmin", "~", "*", "%2A", "%", "%zz"),
    *("a b", "[x]", "@"),
)
UNGRANTED = ("/admin", "/v1/admin", "/v1/items-private", "/V1/")


def differential_targets() -> list[bytes]:
    targets: set[str] = set()
    for atom in ATOMS:
        for shape in (
            "/v1/items/{a}/admin",
            "/v1/items/{a}/../../admin",
            "/{a}/admin",
            "/v1/{a}/items/1",
            "/v1/items{a}",
            "/v1/items/{a}",
            "/v1/items/1/{a}/..%2f..%2fadmin",
        ):
            targets.add(shape.format(a=atom))
    return sorted(t.encode("utf-8", "surrogatepass") for t in targets)


async def test_differential_paths_on_colon_path(h2proxy: Any, backend: Backend) -> None:
    """What reaches the backend is canonical, granted, and the path the audit authorised;
    everything else is a 4xx deny; one audit record per request."""
    client = await RawClient.connect(h2proxy.port, validate=False)
    token = h2proxy.token()
    targets = differential_targets()
    try:
        for raw in targets:
            before = len(backend.streams)
            sid = client.request(raw, token=token)
            answer = await client.answer(sid)
            record = (await h2proxy.wait_audit(0))[-1]
            assert record["request_id"] == answer.field(b"x-request-id").decode()
            if len(backend.streams) > before:
                assert answer.status == 200, raw
                path = backend.headers_of()[b":path"].decode("latin-1")
                assert path == record["path"], raw
                assert path == normalise_path(path), raw
                assert path == "/v1/items" or path.startswith("/v1/items/"), raw  # the grant
                assert not any(path.startswith(prefix) for prefix in UNGRANTED), raw
            else:
                assert 400 <= answer.status < 500, raw
                assert record["decision"] == "deny", raw
        assert len(h2proxy.audit_records()) == len(targets)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"/v1/items/1#frag", "request_rejected"),
        (b"*", "request_rejected"),
        (b"http://evil/v1/items/1", "request_rejected"),
        (b"/v1/items/%2f..%2fadmin", "path_rejected"),
    ],
)
async def test_non_origin_targets_are_refused(
    raw: bytes, reason: str, h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    sid = client.request(raw, token=h2proxy.token())
    answer = await client.answer(sid)
    assert answer.status == 400
    record = await last_audit(h2proxy)
    assert record["reason"] == reason
    assert backend.streams == []


async def test_preface_timeout_closes_and_audits(h2proxy: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", h2proxy.port)
    writer.write(b"PRI * HTTP/2.0\r\n")  # part of the preface, then nothing
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert data == b""
    record = await last_audit(h2proxy)
    assert record["reason"] == "request_timeout"


async def test_idle_connection_gets_goaway(h2proxy: Any, client: RawClient) -> None:
    sid = client.request(token=h2proxy.token())
    await client.answer(sid)
    await client.pump(lambda: client.goaway is not None, within=6.0)
    assert client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.NO_ERROR


# -- the HTTP/1.1 path's other refusals, on HTTP/2 ---------------------------------------


async def test_method_override_metadata_is_refused(
    h2proxy: Any, client: RawClient, backend: Backend
) -> None:
    sid = client.request(
        method=b"POST", extra=[(b"x-http-method-override", b"DELETE")], token=h2proxy.token()
    )
    answer = await client.answer(sid)
    assert answer.status == 400
    record = await last_audit(h2proxy)
    assert record["reason"] == "override_rejected"
    assert backend.streams == []


async def test_body_over_the_limit_is_413(kit: Any, backend: Backend, signing_key: Any) -> None:
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{backend.port}",
        key=signing_key,
        upstream_protocol="http2",
        max_body_bytes=1000,
    )
    client = await RawClient.connect(int(harness.url.rsplit(":", 1)[1]))
    try:
        declared = client.request(
            method=b"POST", extra=[(b"content-length", b"5000")], token=harness.token(), end=False
        )
        assert (await client.answer(declared)).status == 413
        assert backend.streams == []  # refused on the declared length, before the backend
        streamed = client.request(method=b"POST", token=harness.token(), end=False)
        for _ in range(3):
            client.conn.send_data(streamed, b"z" * 600)
        client.flush()
        answer = await client.answer(streamed)
        assert answer.status == 413
        records = await harness.wait_audit(2)
        assert [r["reason"] for r in records] == ["body_too_large", "body_too_large"]
        assert len(backend.bodies.get(3, b"")) <= 1000  # never more than the limit forwarded
    finally:
        await client.close()
        await harness.session.close()
        await runner.cleanup()


async def test_no_policy_is_503_and_grpc_unavailable(
    kit: Any, backend: Backend, signing_key: Any
) -> None:
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{backend.port}",
        key=signing_key,
        upstream_protocol="http2",
        policy_grants=None,
    )
    client = await RawClient.connect(int(harness.url.rsplit(":", 1)[1]))
    try:
        sid = client.request(b"/pkg.Svc/M", method=b"POST", extra=GRPC, token=harness.token())
        answer = await client.answer(sid)
        assert answer.field(b"grpc-status") == b"14"
        record = await last_audit(harness)
        assert (record["reason"], record["status"]) == ("no_policy", 503)
    finally:
        await client.close()
        await harness.session.close()
        await runner.cleanup()
