"""Which headers cross the proxy, in each direction, and which the proxy owns.

Names are compared lower-case. The filters are pure functions over lists of
`(name, value)` pairs so they can be tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
"""RFC 9110 section 7.6.1 connection-specific headers (plus the legacy `Proxy-Connection`)."""

FRAMING: frozenset[str] = frozenset({"content-length", "host", "expect"})
"""Headers that describe the caller's connection to the proxy; the proxy re-creates them."""

IDENTITY_SUBJECT = "X-Nhigate-Subject"
IDENTITY_ISSUER = "X-Nhigate-Issuer"
IDENTITY_GRANT = "X-Nhigate-Grant"
REQUEST_ID = "X-Request-Id"
OWNED_PREFIX = "x-nhigate-"
"""Every `X-Nhigate-*` header is proxy-owned: never accepted from the caller."""

PROXY_OWNED: frozenset[str] = frozenset({"authorization", "x-request-id"})
"""Incoming headers always removed: the caller's credential and our request id."""

FORWARDING: frozenset[str] = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-real-ip",
        "forwarded",
    }
)
"""Client-address headers: kept from a trusted peer proxy only."""

RESPONSE_DROPPED: frozenset[str] = HOP_BY_HOP | frozenset({"content-length"})
"""Upstream response headers not copied to the caller (framing is re-done by the server)."""

Header = tuple[str, str]

_ALWAYS_DROPPED = HOP_BY_HOP | FRAMING | PROXY_OWNED
_DROPPED_UNTRUSTED = _ALWAYS_DROPPED | FORWARDING
_OWNED_PREFIXES = (OWNED_PREFIX, "proxy-")


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """The header names listed in `Connection` header values, lower-cased."""
    names: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return frozenset(names)


_KEEP, _DROP, _CONNECTION = 0, 1, 2
"""What `filter_request_headers` does with a header name."""

_REQUEST_VERDICTS: dict[tuple[frozenset[str], bool], dict[str, int]] = {}
"""Per (`owned`, `trusted_peer`): each header name seen, as received, to its verdict.

A verdict is a pure function of the name and the key, so a cached one is the computed
one. Names are caller-chosen: each table stops growing at `_VERDICTS_MAX_NAMES` (further
names are judged each time), and the tables are dropped when a policy change has made
more than `_VERDICTS_MAX_TABLES` of them."""

_VERDICTS_MAX_NAMES = 4096
_VERDICTS_MAX_TABLES = 32


def _request_verdict(name: str, dropped: frozenset[str], owned: frozenset[str]) -> int:
    lower = name.lower()
    if lower in dropped or lower in owned or lower.startswith(_OWNED_PREFIXES):
        return _CONNECTION if lower == "connection" else _DROP
    return _KEEP


def filter_request_headers(
    headers: Iterable[Header],
    *,
    owned: frozenset[str],
    trusted_peer: bool,
) -> list[Header]:
    """Incoming request headers that may be forwarded upstream.

    Drops hop-by-hop headers and every header named in `Connection`, framing
    headers, `Proxy-*`, the caller's `Authorization`, every `X-Nhigate-*`, the
    extra proxy-owned names in `owned` (assertion and upstream-credential
    headers, lower-case), and client-address headers unless the peer is a
    trusted proxy.
    """
    dropped = _ALWAYS_DROPPED if trusted_peer else _DROPPED_UNTRUSTED
    verdicts = _REQUEST_VERDICTS.get((owned, trusted_peer))
    if verdicts is None:
        if len(_REQUEST_VERDICTS) >= _VERDICTS_MAX_TABLES:
            _REQUEST_VERDICTS.clear()
        verdicts = _REQUEST_VERDICTS[(owned, trusted_peer)] = {}
    known = verdicts.get
    connection: list[str] | None = None
    kept: list[Header] = []
    for header in headers:
        verdict = known(header[0])
        if verdict is None:
            verdict = _request_verdict(header[0], dropped, owned)
            if len(verdicts) < _VERDICTS_MAX_NAMES:
                verdicts[header[0]] = verdict
        if verdict:
            if verdict == _CONNECTION:
                if connection is None:
                    connection = []
                connection.append(header[1])
            continue
        kept.append(header)
    if connection is None:
        return kept
    named = connection_tokens(connection)
    return [(name, value) for name, value in kept if name.lower() not in named]


_RESPONSE_DROPPED_BYTES = frozenset(name.encode("ascii") for name in RESPONSE_DROPPED)


_RESPONSE_NAMES: dict[bytes, str] = {}
"""Upstream header names already seen and kept, raw bytes to their text (Latin-1). The
upstream chooses them: the table stops growing at `_RESPONSE_NAMES_MAX`."""

_RESPONSE_NAMES_MAX = 4096


def filter_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[Header]:
    """Upstream response headers to copy to the caller (minus hop-by-hop and `Connection`-named).

    Names are matched as bytes (ASCII case folding; a Latin-1 name can only fold to an
    ASCII one if it is ASCII), so dropped headers are never decoded.
    """
    known = _RESPONSE_NAMES.get
    kept: list[Header] = []
    for raw_name, raw_value in _kept_response_headers(headers):
        name = known(raw_name)
        if name is None:
            name = raw_name.decode("latin-1")
            if len(_RESPONSE_NAMES) < _RESPONSE_NAMES_MAX:
                _RESPONSE_NAMES[raw_name] = name
        kept.append((name, raw_value.decode("latin-1")))
    return kept


def response_header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """`filter_response_headers(headers)` as the wire lines of a response head
    (`Name: value\r\n` each), with nothing decoded: the same headers, byte for byte."""
    kept = _kept_response_headers(headers)
    if not kept:
        return b""
    return b"\r\n".join(map(b": ".join, kept)) + b"\r\n"


def _kept_response_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """The upstream response headers that are copied to the caller, as received: the
    hop-by-hop ones and those a `Connection` header names are left out."""
    kept: list[tuple[bytes, bytes]] = []
    connection: list[str] | None = None
    for header in headers:
        lower = header[0].lower()
        if lower in _RESPONSE_DROPPED_BYTES:
            if lower == b"connection" and header[1].strip().lower() not in _RESPONSE_DROPPED_BYTES:
                # Not `Connection: keep-alive` (that names a header dropped anyway).
                if connection is None:
                    connection = []
                connection.append(header[1].decode("latin-1"))
            continue
        kept.append(header)
    if connection is None:
        return kept
    named = connection_tokens(connection)  # lower-cased text: compare the names as text
    return [header for header in kept if header[0].decode("latin-1").lower() not in named]


def safe_header_value(value: str) -> str:
    """A header value that cannot break the upstream request framing.

    Identity values come from verified tokens but are still caller-chosen
    text: anything outside printable ASCII is percent-encoded.
    """
    if value.isascii() and value.isprintable():
        return value
    out: list[str] = []
    for ch in value:
        if ch.isascii() and ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)
