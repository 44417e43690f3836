"""Raw-socket tools for the hardening suites: a recording upstream that keeps every byte, a
client that sends exactly the bytes a test wrote, and a real proxy running on its own thread.

Why raw sockets on both sides: aiohttp's client normalises request targets and headers, and
aiohttp's server hides the wire bytes. An attack test must control the bytes sent to the proxy
and see the bytes the proxy sent on; anything the upstream received is re-parsed with llhttp
(httptools) so "the upstream saw exactly the authorised requests" is checked on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httptools
import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))

from jwt_factory import (  # type: ignore[import-not-found]
    TestKey,
    claims_for,
    jwks_for,
    make_signing_key,
    sign,
)

from nhigate.policy import (
    Grant,
    IssuerConfig,
    Policy,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    make_document,
)
from nhigate.proxy.aiohttp_seam import bound_port
from nhigate.proxy.audit import AuditLog
from nhigate.proxy.factory import create_app
from nhigate.proxy.http1 import NativeRunner
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import PolicyHolder
from nhigate.proxy.rejects import rejected_request_audit
from nhigate.proxy.runner import ProxyRunner
from nhigate.proxy.settings import ProxySettings, Upstream
from nhigate.proxy.state import STATE, ProxyState

T = TypeVar("T")

ISSUER = "https://issuer.hardening.test"
ISSUER_NAME = "ci"
AUDIENCE = "payments-api"
SUBJECT = "ci-deployer"

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "ISSUER_NAME",
    "SUBJECT",
    "ProxyThread",
    "RawUpstream",
    "UpstreamMessage",
    "claims_for",
    "jwks_for",
    "make_signing_key",
    "parse_requests",
    "parse_responses",
    "raw_exchange",
    "sign",
]


# -- wire parsing -----------------------------------------------------------------------------


@dataclass
class UpstreamMessage:
    """One HTTP request as parsed from the bytes the upstream received."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.split("?", 1)[0]


class _RequestSink:
    def __init__(self) -> None:
        self.messages: list[UpstreamMessage] = []
        self._headers: list[tuple[str, str]] = []
        self._url = b""
        self._body: list[bytes] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self._headers = []
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        self.messages.append(
            UpstreamMessage(
                method, self._url.decode("latin-1"), self._headers, b"".join(self._body)
            )
        )


def parse_requests(data: bytes) -> list[UpstreamMessage]:
    """Every complete request in `data`; raises httptools.HttpParserError on any malformed byte."""
    sink = _RequestSink()
    sink.parser.feed_data(data)
    return sink.messages


@dataclass
class RawResponse:
    """One response as parsed from the bytes the proxy sent back."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _ResponseSink:
    def __init__(self) -> None:
        self.responses: list[RawResponse] = []
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.responses.append(RawResponse(status, self._headers, b"".join(self._body)))


def parse_responses(data: bytes, *, head_only: bool = False) -> list[RawResponse]:
    """Every complete response in `data` (a trailing partial or garbage tail is ignored).

    `head_only`: the responses answer HEAD requests, so they have no body whatever their
    framing headers say (llhttp cannot be told that).
    """
    if head_only:
        out: list[RawResponse] = []
        for block in data.split(b"\r\n\r\n")[:-1]:
            lines = block.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                break
            headers = [tuple(x.split(": ", 1)) for x in lines[1:] if ": " in x]
            out.append(RawResponse(int(parts[1]), headers, b""))  # type: ignore[arg-type]
        return out
    sink = _ResponseSink()
    with contextlib.suppress(httptools.HttpParserError):
        sink.parser.feed_data(data)
    return sink.responses


def raw_exchange(
    port: int,
    data: bytes,
    *,
    expect: int = 1,
    timeout: float = 5.0,
    chunks: list[bytes] | None = None,
    head_only: bool = False,
) -> tuple[list[RawResponse], bytes, bool]:
    """Send `data` (or `chunks`, one send each) over a fresh TCP connection; read until `expect`
    complete responses arrived, the peer closed, or `timeout` passed.

    Returns (responses, raw bytes received, closed-by-peer).
    """
    received = bytearray()
    closed = False
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for part in chunks if chunks is not None else [data]:
                sock.sendall(part)
        except OSError:
            closed = True  # the proxy closed while we were still sending: that is a refusal
        while not closed:
            if len(parse_responses(bytes(received), head_only=head_only)) >= expect:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not piece:
                closed = True
                break
            received += piece
    return parse_responses(bytes(received), head_only=head_only), bytes(received), closed


# -- the recording upstream -------------------------------------------------------------------

UpstreamMode = str
"""`ok` (200 echoing the target), `rst` (RST on the request), `reset` (RST after half a
response), `hang` (never answer), `garbage` (non-HTTP bytes), `huge_header` (a 1 MiB response
header), `close_early` (close after the head of a Content-Length response)."""


class _UpstreamConnection(asyncio.Protocol):
    def __init__(self, owner: RawUpstream) -> None:
        self.owner = owner
        self.raw = bytearray()
        owner.connections.append(self.raw)
        self.sink = _RequestSink()
        self.transport: asyncio.Transport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.transports.add(self.transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.owner.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.sink.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.owner.parse_errors.append(repr(exc))
            assert self.transport is not None
            self.transport.abort()
            return
        while self.answered < len(self.sink.messages):
            message = self.sink.messages[self.answered]
            self.answered += 1
            self.owner.messages.append(message)
            self._answer(message)

    def _answer(self, message: UpstreamMessage) -> None:
        transport = self.transport
        assert transport is not None
        mode = self.owner.mode
        if mode == "hang":
            return
        if mode == "garbage":
            transport.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
            transport.close()
            return
        if mode == "huge_header":
            transport.write(
                b"HTTP/1.1 200 OK\r\nX-Big: "
                + b"a" * (1024 * 1024)
                + b"\r\nContent-Length: 0\r\n\r\n"
            )
            return
        body = orjson.dumps({"target": message.target})
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        if mode == "rst":
            _set_linger_zero(transport)
            transport.abort()
            return
        if mode == "reset":
            transport.write(head % (len(body) + 1000) + body[:5])
            _set_linger_zero(transport)
            transport.abort()
            return
        if mode == "close_early":
            transport.write(head % (len(body) + 1000))
            transport.close()
            return
        transport.write(head % len(body) + (b"" if message.method == "HEAD" else body))


def _set_linger_zero(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:  # SO_LINGER 0: the close sends RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class RawUpstream:
    """A raw asyncio upstream: records the bytes of every connection and every parsed request."""

    mode: UpstreamMode = "ok"
    port: int = 0
    connections: list[bytearray] = field(default_factory=list)
    messages: list[UpstreamMessage] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)
    transports: set[asyncio.Transport] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _UpstreamConnection(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.transports):
                transport.abort()
            await self._server.wait_closed()

    def reparse(self) -> list[UpstreamMessage]:
        """Re-parse the raw bytes of every connection strictly (llhttp): what the wire said."""
        out: list[UpstreamMessage] = []
        for raw in list(self.connections):
            out.extend(parse_requests(bytes(raw)))
        return out


# -- the proxy on its own thread ----------------------------------------------------------------


def default_service() -> ServiceConfig:
    return ServiceConfig(
        namespace="payments", name="payments-api", backend_service="api", backend_port=8080
    )


def token_grant(name: str, subject: str, paths: tuple[str, ...], methods: tuple[str, ...]) -> Grant:
    """A grant for a token subject of the test issuer."""
    return Grant(
        name=name,
        subjects=(TokenSubject(issuer=ISSUER_NAME, subject=subject),),
        rules=(Rule(methods=frozenset(methods), paths=paths),),
    )


def issuer_for(key: TestKey, **overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {
        "name": ISSUER_NAME,
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "algorithms": ("ES256", "RS256"),
        "max_token_lifetime_seconds": 3600,
        "clock_skew_seconds": 30,
        "jwks": jwks_for(key),
    }
    values.update(overrides)
    return IssuerConfig(**values)


def build_policy(
    key: TestKey, grants: tuple[Grant, ...], issuer: IssuerConfig | None = None
) -> Policy:
    """A compiled policy with one token issuer and `grants`."""
    document = make_document(default_service(), (issuer or issuer_for(key),), grants, ())
    return compile_policy(document)


class ProxyThread:
    """A real proxy app and a `RawUpstream`, served by a uvloop loop on a background thread.

    Tests drive it with blocking sockets (`raw_exchange`) from the test thread, which keeps
    hypothesis examples synchronous and the proxy's loop free of test code.
    """

    def __init__(
        self,
        key: TestKey,
        grants: tuple[Grant, ...],
        *,
        mode: UpstreamMode = "ok",
        upstream_port: int | None = None,
        app_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        self.key = key
        self.grants = grants
        self.upstream = RawUpstream(mode=mode)
        self._upstream_port = upstream_port
        self._settings = settings
        self._app_options = app_options or {}
        self.sink = io.BytesIO()
        self.holder = PolicyHolder()
        self.metrics = ProxyMetrics()
        self.audit = AuditLog(self.sink)
        self.port = 0
        self.app: web.Application | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hardening-proxy", daemon=True)

    # lifecycle

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("proxy thread did not start")
        if self._error is not None:
            raise RuntimeError("proxy thread failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError("the proxy thread failed") from self._error

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._upstream_port is None:
            await self.upstream.start()
            upstream_port = self.upstream.port
        else:
            upstream_port = self._upstream_port
        settings = ProxySettings(
            upstream=Upstream("http", "127.0.0.1", upstream_port),
            listen_port=0,
            admin_port=0,
            **self._settings,
        )
        app = create_app(
            settings,
            holder=self.holder,
            metrics=self.metrics,
            audit=self.audit,
            **self._app_options,
        )
        self.app = app
        # The production runners (server.py): requests go straight to the pipeline.
        runner: Any
        if settings.http1_server == "native":
            runner = NativeRunner(app, shutdown_timeout=2.0)
            await runner.setup()
            self.port = await runner.start("127.0.0.1", 0)
        else:
            runner = ProxyRunner(app, shutdown_timeout=2.0, **rejected_request_audit(app))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = bound_port(site)
        if self.grants is not None:
            self.holder.swap(build_policy(self.key, self.grants))
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self.upstream.stop()

    # driving it from the test thread

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` on the proxy's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], T]) -> T:
        """Run the plain function `fn` on the proxy's loop and return its result."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper())

    def app_state(self) -> ProxyState:
        """The running app's shared state (authenticator, pool, ...)."""
        assert self.app is not None
        return self.app[STATE]

    def token(self, sub: str = SUBJECT, **extra: Any) -> str:
        return str(sign(self.key, claims_for(ISSUER, AUDIENCE, sub, **extra)))

    def set_grants(self, grants: tuple[Grant, ...]) -> Policy:
        policy = build_policy(self.key, grants)
        self.call_soon(lambda: self.holder.swap(policy))
        self.grants = grants
        return policy

    def audit_records(self) -> list[dict[str, Any]]:
        """Every audit record written so far (flushes on the loop, waits for the writer)."""
        self.call_soon(self.audit.flush)
        deadline = time.monotonic() + 5.0
        while self.audit.backlog_bytes and time.monotonic() < deadline:
            time.sleep(0.002)
        return [orjson.loads(line) for line in self.sink.getvalue().splitlines() if line]

    def healthy(self) -> bool:
        """A plain authorised request to a granted route still gets its 200 from the upstream."""
        return self.probe("/v1/items/health") == 200

    def probe(self, path: str, method: str = "GET") -> int:
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {self.token()}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        responses, _, _ = raw_exchange(self.port, request)
        return responses[0].status if responses else 0


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], within: float) -> bool:
    """Poll `predicate` every 10 ms until true or `within` seconds pass."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)


HTTP1_SERVERS = ("aiohttp", "native")
"""The HTTP/1.1 front ends (`--http1-server`): module fixtures run their suite over each."""


def free_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UpstreamThread:
    """A `RawUpstream` alone on a background loop (for proxies run as subprocesses)."""

    def __init__(self, mode: UpstreamMode = "ok") -> None:
        self.upstream = RawUpstream(mode=mode)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hardening-upstream", daemon=True)

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("upstream thread did not start")
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.upstream.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.upstream.stop()


def resource_documents(
    key: TestKey,
    grants: dict[str, tuple[str, list[str], list[str]]],
    *,
    jwks: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Standalone resource files: an IdentityIssuer (inline JWKS of `key`), a ProtectedService
    and one RouteGrant per `grants` entry (name -> (subject, methods, paths))."""
    namespace = "payments"
    issuer = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "IdentityIssuer",
        "metadata": {"name": ISSUER_NAME, "namespace": namespace},
        "spec": {
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "algorithms": ["ES256"],
            "maxTokenLifetime": "1h",
            "jwks": jwks if jwks is not None else jwks_for(key),
        },
    }
    service = {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "ProtectedService",
        "metadata": {"name": "payments-api", "namespace": namespace},
        "spec": {"backend": {"service": "payments-api", "port": 8080}, "issuers": [ISSUER_NAME]},
    }
    docs: dict[str, list[dict[str, Any]]] = {"issuer.yaml": [issuer], "service.yaml": [service]}
    for name, (subject, methods, paths) in grants.items():
        docs[f"grant-{name}.yaml"] = [
            {
                "apiVersion": "nhigate.io/v1alpha1",
                "kind": "RouteGrant",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "target": {"protectedService": "payments-api"},
                    "subjects": [{"token": {"issuer": ISSUER_NAME, "subject": subject}}],
                    "rules": [{"methods": methods, "paths": paths}],
                },
            }
        ]
    return docs


def write_resources(directory: Path, documents: dict[str, list[dict[str, Any]]]) -> None:
    """Write each file atomically (rename), so a poller never reads half a file."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in documents.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(docs))
        tmp.replace(directory / name)
