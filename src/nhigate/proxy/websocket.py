"""WebSocket through the proxy: the handshake checks and the byte relay (docs/proxy.md#websocket).

A request with an `Upgrade` header is relayed as a WebSocket only when it is a well-formed
RFC 6455 opening handshake (GET, HTTP/1.1, `Connection: upgrade`, exactly `Upgrade:
websocket`, one `Sec-WebSocket-Version: 13`, one 16-byte `Sec-WebSocket-Key`, no body) to a
path the ProtectedService declares in `spec.websocket.paths`; every other upgrade (`h2c`,
`tcp`, TLS, a list of tokens, ...) is refused with 400 `upgrade_rejected`. The request is
authenticated and authorised like any other (a grant for GET on the path).

The proxy switches to relaying bytes only when the backend answers `101` with `Upgrade:
websocket`, `Connection: upgrade` and the `Sec-WebSocket-Accept` the key calls for; a
non-101 answer is forwarded as a plain response on a connection that stays HTTP, so neither
side can open a tunnel the proxy has not seen the backend agree to (WebSocket smuggling).

Once open, the proxy relays the bytes unchanged in both directions with flow control, and
watches the frame boundaries of the backend's stream so that it can put a close frame
(1008 policy violation, 1001 going away) between two frames when it ends the connection
itself: when the policy no longer allows it (`Tunnels.recheck`: every connection on each
policy swap; on a `RECHECK_INTERVAL` timer, those whose token or grant expiry has come) or on
shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import httptools
from multidict import MultiMapping

from nhigate.policy import Identity, PathPattern, Policy, Reason
from nhigate.policy.decide import decide_request
from nhigate.proxy.forward import MAX_RESPONSE_HEAD, UpstreamTimeoutError, UpstreamUnavailableError
from nhigate.proxy.headers import connection_tokens

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455 section 1.3: appended to the key before hashing it into `Sec-WebSocket-Accept`."""

RECHECK_INTERVAL = 0.5
"""Seconds between re-checks of open connections against the clock (grant and token expiry);
a policy swap re-checks at once."""

MAX_REFUSAL_BODY = 1024 * 1024
"""Largest body of a non-101 answer to an upgrade that is forwarded (a larger one is a 502)."""

HIGH_WATER = 256 * 1024
"""Bytes queued towards one side before reading from the other side pauses."""

CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001


class UpgradeRefusedError(Exception):
    """An `Upgrade` request the proxy does not relay (-> 400 `upgrade_rejected`)."""


def accept_value(key: str) -> str:
    """The `Sec-WebSocket-Accept` a backend must answer for `key` (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_key(method: str, http11: bool, headers: MultiMapping[str]) -> str:
    """The `Sec-WebSocket-Key` of a well-formed opening handshake; raises
    `UpgradeRefusedError` naming the first problem otherwise.

    `headers` is the request's multidict (`getall`). Any request carrying `Upgrade` must
    pass this check to be proxied at all.
    """
    getall = headers.getall
    upgrade = getall("Upgrade", [])
    if len(upgrade) != 1 or upgrade[0].strip().lower() != "websocket":
        raise UpgradeRefusedError(f"only Upgrade: websocket is relayed, not {upgrade!r:.100}")
    if method != "GET":
        raise UpgradeRefusedError(f"a WebSocket handshake is a GET, not {method}")
    if not http11:
        raise UpgradeRefusedError("a WebSocket handshake needs HTTP/1.1")
    if "upgrade" not in connection_tokens(getall("Connection", [])):
        raise UpgradeRefusedError("Upgrade without Connection: upgrade")
    if getall("Content-Length", []) or getall("Transfer-Encoding", []):
        raise UpgradeRefusedError("a WebSocket handshake carries no body")
    if getall("Sec-WebSocket-Version", []) != ["13"]:
        raise UpgradeRefusedError("Sec-WebSocket-Version must be 13, once")
    keys = getall("Sec-WebSocket-Key", [])
    if len(keys) != 1:
        raise UpgradeRefusedError("exactly one Sec-WebSocket-Key is needed")
    key = keys[0].strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise UpgradeRefusedError("Sec-WebSocket-Key is not 16 bytes in base64")
    return key


def declared_path(patterns: Iterable[str], path: str) -> bool:
    """True when the canonical `path` matches one of the service's WebSocket path patterns."""
    return any(PathPattern.compile(pattern).matches(path) for pattern in patterns)


def switched(status: int, headers: list[tuple[bytes, bytes]], key: str) -> bool:
    """True when a backend's answer completes the handshake for `key` (RFC 6455 section 4.1)."""
    if status != 101:
        return False
    upgrade: list[bytes] = []
    connection: list[str] = []
    accept: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"upgrade":
            upgrade.append(value)
        elif lower == b"connection":
            connection.append(value.decode("latin-1"))
        elif lower == b"sec-websocket-accept":
            accept.append(value)
    return (
        len(upgrade) == 1
        and upgrade[0].strip().lower() == b"websocket"
        and "upgrade" in connection_tokens(connection)
        and accept == [accept_value(key).encode("ascii")]
    )


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked (server-to-client) close frame with `code` and a reason of <= 123 bytes."""
    payload = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
    return bytes((0x88, len(payload))) + payload


class FrameBoundary:
    """Follows the frame headers of one direction of a WebSocket byte stream, so the proxy
    knows whether it stands between two frames (where a close frame may be put)."""

    __slots__ = ("_head", "_remaining")

    def __init__(self) -> None:
        self._remaining = 0
        """Payload bytes of the current frame not seen yet."""
        self._head = b""
        """The start of a frame header split across reads."""

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        pos = 0
        size = len(data)
        if self._remaining:
            if self._remaining >= size:
                self._remaining -= size
                return
            pos = self._remaining
            self._remaining = 0
        if self._head:
            data = self._head + data[pos:]
            self._head = b""
            pos = 0
            size = len(data)
        while pos < size:
            if size - pos < 2:
                self._head = data[pos:]
                return
            second = data[pos + 1]
            length = second & 0x7F
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if second & 0x80:
                head += 4  # masking key
            if size - pos < head:
                self._head = data[pos:]
                return
            if length == 126:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            pos += head + length
        if pos > size:
            self._remaining = pos - size


@dataclass(slots=True)
class BackendAnswer:
    """The backend's answer to a forwarded handshake."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    """The whole response body of a non-101 answer (bytes after a 101 are `Backend.early`)."""


class _Head:
    """httptools callbacks collecting the first final response (interim 1xx other than 101
    skipped) and, for a non-101, its body; anything after it is ignored."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head_done:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim response: the real one follows
            return
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if self.head_done and not self.complete:
            self.body.append(body)
            self.size += len(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


class Backend(asyncio.Protocol):
    """The proxy's own connection to the backend for one WebSocket (never pooled)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._head = _Head()
        self._parser = self._head.parser
        self._waiter: asyncio.Future[None] | None = None
        self._answer: BackendAnswer | None = None
        self._error: Exception | None = None
        self._head_bytes = 0
        self.tunnel: Tunnel | None = None
        self.closed = False
        self.early: list[bytes] = []
        """Bytes after a 101 that arrived before the tunnel was attached (relayed first)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_backend(data)
            return
        if self._answer is not None:
            # After a 101: the new protocol, held until the tunnel is attached. After any
            # other answer: never relayed (the connection is being closed).
            if self._answer.status == 101 and self.transport is not None:
                self.early.append(data)
                if sum(map(len, self.early)) > HIGH_WATER:
                    self.transport.pause_reading()
            return
        self._head_bytes += len(data)
        head = self._head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            if offset < len(data):
                self.early.append(data[offset:])
            self._settle(BackendAnswer(head.status, head.headers, b""))
            return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailableError(f"malformed upstream response: {exc}"))
            return
        if not head.head_done and self._head_bytes > MAX_RESPONSE_HEAD:
            self._fail(UpstreamUnavailableError(f"upstream response head over {MAX_RESPONSE_HEAD}"))
        elif head.size > MAX_REFUSAL_BODY:
            self._fail(UpstreamUnavailableError("upstream answer to an upgrade is too large"))
        elif head.complete:
            self._settle(BackendAnswer(head.status, head.headers, b"".join(head.body)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.end("backend")
        elif self._answer is None:
            head = self._head
            if head.head_done and not self._has_framing():  # body delimited by the close
                self._settle(BackendAnswer(head.status, head.headers, b"".join(head.body)))
            else:
                self._fail(UpstreamUnavailableError("upstream closed the connection"))

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.pause_client()

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.resume_client()

    def _has_framing(self) -> bool:
        return any(
            name.lower() in (b"content-length", b"transfer-encoding")
            for name, _ in self._head.headers
        )

    def _settle(self, answer: BackendAnswer) -> None:
        self._answer = answer
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None and self._answer is None:
            self._error = error
        if self.transport is not None:
            self.transport.abort()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def answer(self, within: float) -> BackendAnswer:
        """The backend's answer to the handshake written on this connection (in `within` s)."""
        if self._answer is None and self._error is None:
            self._waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(within):
                    await self._waiter
            except TimeoutError:
                self.close()
                raise UpstreamTimeoutError(f"no upstream answer for {within:g}s") from None
        if self._answer is None:
            raise self._error or UpstreamUnavailableError("no upstream answer")
        return self._answer

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


async def connect_backend(
    host: str, port: int, ssl_context: ssl.SSLContext | None, within: float
) -> Backend:
    """A new connection to the backend (in `within` s); `UpstreamTimeoutError` or
    `UpstreamUnavailableError` otherwise."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            _, backend = await loop.create_connection(
                lambda: Backend(loop),
                host,
                port,
                ssl=ssl_context,
            )
    except TimeoutError:
        raise UpstreamTimeoutError(f"connecting to {host}:{port} took over {within:g}s") from None
    except OSError as exc:
        raise UpstreamUnavailableError(f"cannot connect to {host}:{port}: {exc}") from None
    return backend


class ClientSide:
    """The payload parser aiohttp feeds the caller's bytes to once the connection switched."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._tunnel.from_client(data)
        return False, b""

    def feed_eof(self) -> None:
        self._tunnel.end("client")


class Tunnel:
    """One open WebSocket: bytes both ways, the counts, and who ended it."""

    def __init__(
        self,
        client: asyncio.Transport,
        backend: Backend,
        *,
        identity: Identity,
        path: str,
        tenant: str | None,
        token_expiry: float | None,
    ) -> None:
        assert backend.transport is not None
        self._client = client
        self._backend = backend
        self._backend_transport = backend.transport
        self.identity = identity
        self.path = path
        self.tenant = tenant
        self.token_expiry = token_expiry
        self.deadline = token_expiry
        """When the clock alone could end this connection (its token's `exp` or the `expiresAt`
        of the grant that allows it): the timer re-decides it then, not before."""
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.closed_by: str | None = None
        self.reason = Reason.ALLOWED
        self.detail: str | None = None
        self._downstream = FrameBoundary()
        self._client_paused = False
        self._backend_paused = False
        self._waiter: asyncio.Future[None] | None = None
        backend.tunnel = self
        early, backend.early = backend.early, []
        for data in early:  # what the backend sent right after its 101, in order
            self.from_backend(data)
        if early:
            self._backend_transport.resume_reading()
        if backend.closed:  # it already went away: the caller gets what it sent, then the close
            self.end("backend")

    # -- bytes -----------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.closed_by is not None:
            return
        self.bytes_from_client += len(data)
        self._backend_transport.write(data)

    def from_backend(self, data: bytes) -> None:
        if self.closed_by is not None:
            return
        self.bytes_to_client += len(data)
        self._downstream.feed(data)
        client = self._client
        client.write(data)
        if not self._backend_paused and client.get_write_buffer_size() > HIGH_WATER:
            self._backend_paused = True
            self._backend_transport.pause_reading()
            self._wake()

    async def wait(self) -> bool:
        """Until the connection ends (False) or the caller's socket is full (True: drain it,
        then `resume_backend`)."""
        while self.closed_by is None and not self._backend_paused:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self.closed_by is None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def resume_backend(self) -> None:
        """The caller's socket drained: read from the backend again."""
        if self._backend_paused and self.closed_by is None:
            self._backend_paused = False
            self._backend_transport.resume_reading()

    def pause_client(self) -> None:
        if not self._client_paused and self.closed_by is None:
            self._client_paused = True
            self._client.pause_reading()

    def resume_client(self) -> None:
        if self._client_paused and self.closed_by is None:
            self._client_paused = False
            self._client.resume_reading()

    # -- ending ----------------------------------------------------------------------------

    def end(self, by: str) -> None:
        """One side went away (`client`/`backend`): close the other after its queued bytes."""
        if self.closed_by is not None:
            return
        self.closed_by = by
        self._client.close()
        self._backend.close()
        self._wake()

    def shut(self, reason: Reason, code: int, detail: str) -> None:
        """The proxy ends the connection: a close frame to the caller when the backend's
        stream is between frames (else just the connection close), then both closed."""
        if self.closed_by is not None:
            return
        self.reason = reason
        self.detail = detail
        if self._downstream.at_boundary:
            self._client.write(close_frame(code, reason.value))
        self.end("proxy")

    def problem(
        self, policy: Policy, expiries: Mapping[str, float | None], now: float
    ) -> Reason | None:
        """Why the policy no longer allows this connection at `now` (None: it still does, and
        `deadline` is set to when the clock could change that). `expiries`: `expiresAt` per
        grant name."""
        if self.token_expiry is not None and now >= self.token_expiry:
            return Reason.TOKEN_EXPIRED
        if not declared_path(policy.document.service.websocket_paths, self.path):
            return Reason.UPGRADE_REJECTED
        decision = decide_request(policy, self.identity, "GET", self.path, now, self.tenant)
        if not decision.allowed:
            return decision.reason
        # Nothing else in a policy turns an allow into a deny as time passes: revocations
        # only end, grants that are not yet valid only begin.
        ends = [t for t in (self.token_expiry, expiries.get(decision.grant or "")) if t is not None]
        self.deadline = min(ends) if ends else None
        return None


class Tunnels:
    """The open WebSockets of one proxy process, re-checked against the policy."""

    def __init__(self) -> None:
        self.open: set[Tunnel] = set()
        self._expiries: tuple[Policy | None, dict[str, float | None]] = (None, {})

    def add(self, tunnel: Tunnel, policy: Policy, now: float) -> None:
        """Track an opened connection (its handshake was just allowed under `policy`)."""
        self.open.add(tunnel)
        tunnel.problem(policy, self._expiries_of(policy), now)  # sets its deadline

    def remove(self, tunnel: Tunnel) -> None:
        """Stop tracking a connection that ended."""
        self.open.discard(tunnel)

    def recheck(self, policy: Policy | None, now: float, *, due_only: bool = False) -> None:
        """Close every connection the policy (or the clock) no longer allows. `due_only` (the
        timer): re-decide only connections whose deadline has passed."""
        if not self.open:
            return
        expiries = self._expiries_of(policy) if policy is not None else {}
        for tunnel in list(self.open):
            if due_only and (tunnel.deadline is None or now < tunnel.deadline):
                continue
            reason = Reason.NO_POLICY if policy is None else tunnel.problem(policy, expiries, now)
            if reason is not None:
                tunnel.shut(reason, CLOSE_POLICY, "the policy no longer allows this connection")

    def _expiries_of(self, policy: Policy) -> dict[str, float | None]:
        cached_for, expiries = self._expiries
        if cached_for is not policy:
            expiries = {grant.name: grant.expires_at for grant in policy.grants}
            self._expiries = (policy, expiries)
        return expiries

    def shut_all(self) -> None:
        """Shutdown: every connection gets 1001 going away."""
        for tunnel in list(self.open):
            tunnel.shut(Reason.ALLOWED, CLOSE_GOING_AWAY, "proxy shutting down")


def token_expiry(identity: Identity) -> float | None:
    """The token's `exp`, when it has one (an open connection ends when its token does)."""
    exp = identity.claims.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None
