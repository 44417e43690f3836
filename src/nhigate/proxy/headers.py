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
    connection: list[str] | None = None
    kept: list[Header] = []
    for name, value in headers:
        lower = name.lower()
        if lower in dropped or lower in owned or lower.startswith(_OWNED_PREFIXES):
            if lower == "connection":
                if connection is None:
                    connection = []
                connection.append(value)
            continue
        kept.append((name, value))
    if connection is None:
        return kept
    named = connection_tokens(connection)
    return [(name, value) for name, value in kept if name.lower() not in named]


_RESPONSE_DROPPED_BYTES = frozenset(name.encode("ascii") for name in RESPONSE_DROPPED)


def filter_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[Header]:
    """Upstream response headers to copy to the caller (minus hop-by-hop and `Connection`-named).

    Names are matched as bytes (ASCII case folding; a Latin-1 name can only fold to an
    ASCII one if it is ASCII), so dropped headers are never decoded.
    """
    connection: list[str] | None = None
    kept: list[Header] = []
    for raw_name, raw_value in headers:
        lower = raw_name.lower()
        if lower in _RESPONSE_DROPPED_BYTES:
            if lower == b"connection":
                if connection is None:
                    connection = []
                connection.append(raw_value.decode("latin-1"))
            continue
        kept.append((raw_name.decode("latin-1"), raw_value.decode("latin-1")))
    if connection is None:
        return kept
    named = connection_tokens(connection) - RESPONSE_DROPPED  # those are gone already
    if not named:  # e.g. `Connection: keep-alive`
        return kept
    return [(name, value) for name, value in kept if name.lower() not in named]


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
