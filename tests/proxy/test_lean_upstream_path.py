"""The shortcuts of the lean upstream path: per-name caches and lazy framing (issue 16).

They exist for speed only: a cached answer must be the answer computed afresh, for every
`owned` set and peer trust, whatever was seen before, and a caller or an upstream that
sends many names cannot grow them without bound or switch a check off.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from nhigate.proxy import forward, headers
from nhigate.proxy.forward import UnsafeHeadError, serialise_head
from nhigate.proxy.headers import (
    filter_request_headers,
    filter_response_headers,
    response_header_lines,
)

INCOMING = [
    ("Host", "gw"),
    ("Accept", "*/*"),
    ("authorization", "Bearer t"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Upstream-Key", "stolen"),
    ("x-nhigate-subject", "admin"),
    ("Proxy-Authorization", "x"),
    ("Connection", "keep-alive, X-Secret"),
    ("X-Secret", "s"),
    ("Keep-Alive", "timeout=5"),
    ("X-Ok", "1"),
]


def _fresh_filter(items: list[tuple[str, str]], owned: frozenset[str], trusted: bool) -> list:
    headers._REQUEST_VERDICTS.clear()
    return filter_request_headers(items, owned=owned, trusted_peer=trusted)


@pytest.mark.parametrize("trusted", [False, True])
def test_request_verdicts_follow_owned_and_trust_not_what_was_seen_before(trusted: bool) -> None:
    plain: frozenset[str] = frozenset()
    owning = frozenset({"x-upstream-key"})
    expected_plain = _fresh_filter(INCOMING, plain, trusted)
    expected_owning = _fresh_filter(INCOMING, owning, trusted)
    assert ("X-Upstream-Key", "stolen") in expected_plain
    assert ("X-Upstream-Key", "stolen") not in expected_owning
    # Interleaved, warm: the same answers as cold, in both orders.
    for _ in range(3):
        for owned, expected in ((plain, expected_plain), (owning, expected_owning)):
            assert filter_request_headers(INCOMING, owned=owned, trusted_peer=trusted) == expected
    assert filter_request_headers(INCOMING, owned=owning, trusted_peer=not trusted) == (
        _fresh_filter(INCOMING, owning, not trusted)
    )


def test_request_filter_still_drops_connection_named_and_owned_headers_when_warm() -> None:
    owned = frozenset({"x-upstream-key"})
    for _ in range(3):
        kept = filter_request_headers(INCOMING, owned=owned, trusted_peer=False)
        assert kept == [("Accept", "*/*"), ("X-Ok", "1")]


def test_request_verdict_tables_are_bounded_and_keep_judging_past_the_bound() -> None:
    headers._REQUEST_VERDICTS.clear()
    flood = [(f"X-Flood-{i}", "v") for i in range(headers._VERDICTS_MAX_NAMES + 100)]
    owned: frozenset[str] = frozenset()
    assert len(filter_request_headers(flood, owned=owned, trusted_peer=False)) == len(flood)
    table = headers._REQUEST_VERDICTS[(owned, False)]
    assert len(table) == headers._VERDICTS_MAX_NAMES
    late = [("X-NHIGATE-GRANT", "forged"), ("AUTHORIZATION", "Bearer t"), ("x-late", "1")]
    assert filter_request_headers(late, owned=owned, trusted_peer=False) == [("x-late", "1")]
    for n in range(headers._VERDICTS_MAX_TABLES + 3):  # many policies' owned sets
        filter_request_headers(INCOMING, owned=frozenset({f"x-key-{n}"}), trusted_peer=False)
    assert len(headers._REQUEST_VERDICTS) <= headers._VERDICTS_MAX_TABLES


UPSTREAM = [
    (b"Server", b"up"),
    (b"Content-Length", b"2"),
    (b"Connection", b"keep-alive, X-Hop"),
    (b"X-Hop", b"h"),
    (b"Transfer-Encoding", b"chunked"),
    (b"X-Caf\xe9", b"\xe9t\xe9"),
    (b"content-type", b"text/plain"),
]


def test_response_filter_gives_the_same_answer_cold_and_warm() -> None:
    headers._RESPONSE_NAMES.clear()
    expected = [("Server", "up"), ("X-Café", "été"), ("content-type", "text/plain")]
    for _ in range(3):
        assert filter_response_headers(UPSTREAM) == expected
    assert b"Content-Length" not in headers._RESPONSE_NAMES  # dropped names are never cached
    assert filter_response_headers([(b"Connection", b"close"), (b"X-Hop", b"h")]) == [
        ("X-Hop", "h")
    ]  # a cached name is still removed when this response's Connection names it
    assert filter_response_headers([(b"X-Hop", b"h"), (b"Connection", b"x-hop")]) == []


def test_response_name_table_is_bounded() -> None:
    headers._RESPONSE_NAMES.clear()
    flood = [(b"X-Up-%d" % i, b"v") for i in range(headers._RESPONSE_NAMES_MAX + 50)]
    assert len(filter_response_headers(flood)) == len(flood)
    assert len(headers._RESPONSE_NAMES) == headers._RESPONSE_NAMES_MAX
    assert filter_response_headers([(b"KEEP-ALIVE", b"1"), (b"x-new", b"2")]) == [("x-new", "2")]


RESPONSES = [
    UPSTREAM,
    [],
    [(b"Connection", b"keep-alive"), (b"Content-Length", b"5")],
    [(b"Connection", b"close"), (b"X-Hop", b"h"), (b"x-hop", b"again"), (b"X-Stay", b"s")],
    [(b"X-Hop", b"h"), (b"Connection", b"x-hop, X-Other"), (b"x-other", b"o")],
    [(b"CONNECTION", b"X-CAF\xc9"), (b"x-caf\xe9", b"dropped"), (b"X-Caf\xe9", b"dropped")],
    [(b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers"), (b"Upgrade", b"h2c")],
    [(b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"x"), (b"Trailer", b"X-T")],
    [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-Empty", b"")],
]


@pytest.mark.parametrize("upstream", RESPONSES)
def test_the_native_response_head_carries_exactly_the_filtered_headers(
    upstream: list[tuple[bytes, bytes]],
) -> None:
    # The native front end writes these bytes without decoding them: they must be what the
    # other front ends copy, byte for byte, hop-by-hop and Connection-named headers gone.
    expected = b"".join(
        f"{name}: {value}\r\n".encode("latin-1")
        for name, value in filter_response_headers(upstream)
    )
    assert response_header_lines(upstream) == expected


def test_the_native_response_head_lines_are_what_is_kept() -> None:
    assert response_header_lines(UPSTREAM) == (
        b"Server: up\r\nX-Caf\xe9: \xe9t\xe9\r\ncontent-type: text/plain\r\n"
    )
    named = [(b"X-Hop", b"h"), (b"Connection", b"x-hop, X-Other"), (b"x-other", b"o")]
    assert response_header_lines(named) == b""
    assert response_header_lines([(b"Connection", b"close"), (b"X-Hop", b"h")]) == b"X-Hop: h\r\n"


def test_serialiser_checks_survive_warm_and_full_caches() -> None:
    forward._SAFE_METHODS.clear()
    forward._SAFE_NAMES.clear()
    serialise_head("GET", "/", [("Host", "a"), ("X-A", "1")])
    for n in itertools.count():  # fill both tables with valid entries
        if len(forward._SAFE_METHODS) >= forward._SAFE_METHODS_MAX:
            break
        serialise_head(f"M{n}", "/", [(f"X-N{n}", "v")])
    for bad_method in ("GET /x HTTP/1.1\r\n\r\nGET", "GE T", ""):
        with pytest.raises(UnsafeHeadError):
            serialise_head(bad_method, "/", [("Host", "a")])
    for bad_target in ("/a\tb", "/a b", "/a\r\nX: 1", "/a\x00", ""):
        with pytest.raises(UnsafeHeadError):
            serialise_head("GET", bad_target, [("Host", "a")])
    for bad_name in ("X A", "Host: evil", "X-A\r\nX-B"):
        with pytest.raises(UnsafeHeadError):
            serialise_head("GET", "/", [("Host", "a"), ("X-A", "1"), (bad_name, "v")])
    assert len(forward._SAFE_METHODS) == forward._SAFE_METHODS_MAX


# -- the response framing, judged only when the upstream closes ------------------------------


async def _read_through_pool(answer: bytes) -> bytes:
    """One GET through `UpstreamPool` to a server that writes `answer` and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = forward.UpstreamPool("127.0.0.1", port, read_timeout=5.0)
    try:
        head = serialise_head("GET", "/", [("Host", "up")])
        response = await pool.request(head, None, is_head=False, idempotent=True)
        return b"".join([chunk async for chunk in response.iter_chunks()])
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_a_body_delimited_by_the_close_is_complete() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n" + b"x" * 70_000
    assert await _read_through_pool(answer) == b"x" * 70_000


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 10", b"content-length: 10", b"Transfer-Encoding: chunked"]
)
async def test_a_framed_body_cut_by_the_close_is_an_upstream_error(framing: bytes) -> None:
    body = b"abc" if framing.lower().startswith(b"content") else b"a\r\nabc"
    answer = b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n" + body
    with pytest.raises(forward.UpstreamUnavailableError):
        await _read_through_pool(answer)
