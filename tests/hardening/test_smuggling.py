"""Request smuggling and malformed framing over raw sockets.

Each case writes exact bytes to a real proxy in front of a raw recording upstream and checks:
- the caller gets the expected statuses (a 4xx for every malformed or ungranted request);
- the upstream received only the authorised requests the case names, and the bytes it got
  re-parse strictly (llhttp) into exactly those requests: nothing was smuggled inside them;
- every response the caller got has exactly one audit record, including the 400s aiohttp's
  HTTP parser writes itself (regression: those used to leave no audit record);
- the proxy still serves a plain authorised request afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from harness import HTTP1_SERVERS, SUBJECT, ProxyThread, make_signing_key, raw_exchange, token_grant

GRANTS = (
    token_grant("read", SUBJECT, ("/v1/items/**",), ("GET", "HEAD")),
    token_grant("write", SUBJECT, ("/v1/items/*",), ("POST",)),
)

Build = Callable[[str, int], bytes | list[bytes]]
"""(token, upstream port) -> the bytes to send (a list: one send() per element)."""


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    statuses: tuple[int, ...]
    """The statuses the caller must get, in order (empty: the proxy may just close)."""
    reaches: tuple[tuple[str, str], ...] = ()
    """(method, target) the upstream must receive: exactly these, nothing else."""
    bodies: tuple[bytes, ...] | None = None
    """When set, the bodies of the upstream requests, in order."""
    closes: bool = False
    """The proxy must close the connection after answering."""
    audited: tuple[str, ...] = field(default=())
    """Expected audit reasons, in order (default: checked by count only)."""


def _req(method: str, target: str, token: str | None, *extra: str, body: str = "") -> str:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines.extend(extra)
    return "\r\n".join(lines) + "\r\n\r\n" + body


def _b(text: str) -> bytes:
    return text.encode("latin-1")


SMUGGLED = "GET /admin HTTP/1.1\r\nHost: proxy\r\n\r\n"

CASES = [
    Case(
        "duplicate Content-Length",
        lambda t, _: _b(
            _req("POST", "/v1/items/1", t, "Content-Length: 5", "Content-Length: 6", body="hello!")
        ),
        (400,),
        closes=True,
        audited=("request_rejected",),
    ),
    Case(
        "Transfer-Encoding + Content-Length (CL.TE)",
        lambda t, _: _b(
            _req(
                "POST",
                "/v1/items/1",
                t,
                "Content-Length: 4",
                "Transfer-Encoding: chunked",
                body="0\r\n\r\n" + SMUGGLED,
            )
        ),
        (400,),
        closes=True,
    ),
    Case(
        "Content-Length + Transfer-Encoding (TE.CL)",
        lambda t, _: _b(
            _req(
                "POST",
                "/v1/items/1",
                t,
                "Transfer-Encoding: chunked",
                "Content-Length: 40",
                body="5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
            )
        ),
        (400,),
        closes=True,
    ),
    Case(
        "Transfer-Encoding: chunked, identity",
        lambda t, _: _b(
            _req("POST", "/v1/items/1", t, "Transfer-Encoding: chunked, identity", body="0\r\n\r\n")
        ),
        (400,),
        closes=True,
    ),
    Case(
        "Transfer-Encoding: xchunked",
        lambda t, _: _b(
            _req("POST", "/v1/items/1", t, "Transfer-Encoding: xchunked", body="0\r\n\r\n")
        ),
        (400,),
        closes=True,
    ),
    Case(
        "Transfer-Encoding twice",
        lambda t, _: _b(
            _req(
                "POST",
                "/v1/items/1",
                t,
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: chunked",
                body="0\r\n\r\n",
            )
        ),
        (400,),
        closes=True,
    ),
    Case(
        "obs-fold header line",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "X-A: a", " Transfer-Encoding: chunked")),
        (400,),
        closes=True,
    ),
    Case(
        "obs-fold continuing Authorization",
        lambda t, _: _b(_req("GET", "/admin", None, "Authorization: Bearer", f" {t}")),
        (400,),
        closes=True,
    ),
    Case(
        "duplicate Authorization",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "Authorization: Bearer x.y.z")),
        (400,),
        audited=("request_rejected",),
    ),
    Case(
        "duplicate Host",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "Host: admin.internal")),
        (400,),
        closes=True,
    ),
    Case(
        "absolute-form target to an ungranted route",
        lambda t, port: _b(_req("GET", f"http://127.0.0.1:{port}/admin", t)),
        (400,),
        audited=("request_rejected",),
    ),
    Case(
        "absolute-form target to a granted route",
        lambda t, port: _b(_req("GET", f"http://127.0.0.1:{port}/v1/items/1", t)),
        (400,),
    ),
    Case(
        "absolute-form with userinfo",
        lambda t, port: _b(_req("GET", f"http://127.0.0.1:{port}@evil/admin", t)),
        (400,),
    ),
    Case(
        "authority-form CONNECT",
        lambda t, port: _b(_req("CONNECT", f"127.0.0.1:{port}", t)),
        (400,),
    ),
    Case("OPTIONS *", lambda t, _: _b(_req("OPTIONS", "*", t)), (400,)),
    Case("TRACE", lambda t, _: _b(_req("TRACE", "/v1/items/1", t)), (400,)),
    Case(
        "bare LF line endings",
        lambda t, _: _b(f"GET /v1/items/1 HTTP/1.1\nHost: proxy\nAuthorization: Bearer {t}\n\n"),
        (400,),
        closes=True,
    ),
    Case(
        "bare LF hiding a second request",
        lambda t, _: _b(
            f"GET /v1/items/1 HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {t}\r\n"
            "X-A: 1\nGET /admin HTTP/1.1\r\n\r\n"
        ),
        (400,),
        closes=True,
    ),
    Case(
        "header name with a space",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "X Forwarded: 1")),
        (400,),
        closes=True,
    ),
    Case(
        "space before the colon of Authorization",
        lambda t, _: _b(_req("GET", "/admin", None, f"Authorization : Bearer {t}")),
        (400,),
        closes=True,
    ),
    Case(
        "NUL in a header value",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "X-A: a\x00b")),
        (400,),
        closes=True,
    ),
    Case(
        "CR in a header value",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "X-A: a\rGET /admin")),
        (400,),
        closes=True,
    ),
    Case(
        "non-UTF-8 bytes in a header value (forwarded byte for byte)",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "X-A: a\xff\xfeb")),
        (200,),
        reaches=(("GET", "/v1/items/1"),),
    ),
    Case(
        "non-UTF-8 byte in the path",
        lambda t, _: _b(_req("GET", "/v1/items/\xff", t)),
        (400,),
        closes=True,
    ),
    Case("NUL in the path", lambda t, _: _b(_req("GET", "/v1/items/a\x00/../../admin", t)), (400,)),
    Case(
        "%00 in the path",
        lambda t, _: _b(_req("GET", "/v1/items/a%00/../../admin", t)),
        (400,),
        audited=("path_rejected",),
    ),
    Case(
        "raw UTF-8 in the path",
        lambda t, _: _req("GET", "/v1/items/\u00e9", t).encode("utf-8"),
        (400,),
        closes=True,
    ),
    Case(
        "huge header (64 KiB)",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, "X-Big: " + "a" * 65536)),
        (400,),
        closes=True,
    ),
    Case(
        "huge Authorization header (64 KiB)",
        lambda t, _: _b(_req("GET", "/v1/items/1", None, "Authorization: Bearer " + "a" * 65536)),
        (400,),
        closes=True,
    ),
    Case(
        "10k headers",
        lambda t, _: _b(_req("GET", "/v1/items/1", t, *(f"X-H{i}: v" for i in range(10_000)))),
        (400,),
        closes=True,
    ),
    Case(
        "request line over 8 KiB",
        lambda t, _: _b(_req("GET", "/v1/items/" + "a" * 9000, t)),
        (400,),
        closes=True,
    ),
    Case(
        "pipelined: granted then ungranted",
        lambda t, _: _b(_req("GET", "/v1/items/1", t) + _req("GET", "/admin", t)),
        (200, 403),
        reaches=(("GET", "/v1/items/1"),),
        audited=("allowed", "no_matching_grant"),
    ),
    Case(
        "pipelined: granted then a path trick",
        lambda t, _: _b(
            _req("GET", "/v1/items/1", t) + _req("GET", "/v1/items/%2e%2e/%2e%2e/admin", t)
        ),
        (200, 403),
        reaches=(("GET", "/v1/items/1"),),
    ),
    Case(
        "pipelined: granted then malformed",
        lambda t, _: _b(_req("GET", "/v1/items/1", t) + "GET /admin HTTP/1.1\r\nX A: 1\r\n\r\n"),
        (400,),  # aiohttp refuses the whole batch: the good request is never forwarded
        closes=True,
    ),
    Case(
        "pipelined in separate segments",
        lambda t, _: [_b(_req("GET", "/v1/items/1", t)), _b(_req("GET", "/admin", t))],
        (200, 403),
        reaches=(("GET", "/v1/items/1"),),
    ),
    Case(
        "body holding a second request (Content-Length framed)",
        lambda t, _: _b(
            _req("POST", "/v1/items/1", t, f"Content-Length: {len(SMUGGLED)}", body=SMUGGLED)
        ),
        (200,),
        reaches=(("POST", "/v1/items/1"),),
        bodies=(SMUGGLED.encode(),),
    ),
    Case(
        "body holding a second request (chunked)",
        lambda t, _: _b(
            _req(
                "POST",
                "/v1/items/1",
                t,
                "Transfer-Encoding: chunked",
                body=f"{len(SMUGGLED):x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
            )
        ),
        (200,),
        reaches=(("POST", "/v1/items/1"),),
        bodies=(SMUGGLED.encode(),),
    ),
    Case(
        "Content-Length: 0 then a bare request (no credential)",
        lambda t, _: _b(_req("POST", "/v1/items/1", t, "Content-Length: 0") + SMUGGLED),
        (200, 401),
        reaches=(("POST", "/v1/items/1"),),
        audited=("allowed", "credential_missing"),
    ),
    Case(
        "chunk size with junk",
        lambda t, _: _b(
            _req(
                "POST",
                "/v1/items/1",
                t,
                "Transfer-Encoding: chunked",
                body="5x\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
            )
        ),
        (),
    ),
    Case(
        "negative Content-Length",
        lambda t, _: _b(_req("POST", "/v1/items/1", t, "Content-Length: -1")),
        (400,),
        closes=True,
    ),
    Case(
        "Content-Length with a plus sign",
        lambda t, _: _b(_req("POST", "/v1/items/1", t, "Content-Length: +5", body="hello")),
        (400,),
        closes=True,
    ),
    Case(
        "HTTP/0.9 request",
        lambda t, _: b"GET /admin\r\n\r\n",
        (),
    ),
    Case(
        "HTTP/2 preface",
        lambda t, _: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        (),
    ),
    Case(
        "h2c upgrade is refused",  # only a WebSocket handshake to a declared path may upgrade
        lambda t, _: _b(
            _req(
                "GET",
                "/v1/items/1",
                t,
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAAQAAP__",
            )
        ),
        (400,),
    ),
    Case(
        "WebSocket upgrade to an undeclared path is refused",
        lambda t, _: _b(
            _req(
                "GET",
                "/v1/items/1",
                t,
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            )
        ),
        (400,),
    ),
    Case(
        "Connection: names Authorization and proxy-owned headers",
        lambda t, _: _b(
            _req(
                "GET",
                "/v1/items/1",
                t,
                "Connection: Authorization, X-Nhigate-Subject",
                "X-Nhigate-Subject: admin",
            )
        ),
        (200,),
        reaches=(("GET", "/v1/items/1"),),
    ),
    Case(
        "two spaces in the request line",
        lambda t, _: _b(f"GET  /admin HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {t}\r\n\r\n"),
        (),
    ),
    Case(
        "lower-case method",
        lambda t, _: _b(_req("get", "/v1/items/1", t)),
        (),
    ),
]


@pytest.fixture(scope="module", params=HTTP1_SERVERS)
def proxy(request: pytest.FixtureRequest) -> Iterator[ProxyThread]:
    key = make_signing_key("ES256", kid="smuggle")
    with ProxyThread(key, GRANTS, http1_server=request.param) as running:
        yield running


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_smuggling_shape(proxy: ProxyThread, case: Case) -> None:
    audit_before = len(proxy.audit_records())
    upstream_before = len(proxy.upstream.messages)
    data = case.build(proxy.token(), proxy.upstream.port)
    chunks = data if isinstance(data, list) else None
    payload = data if isinstance(data, bytes) else b""
    # For cases that must close, read past the last answer: only the close ends the read.
    expect = max(1, len(case.statuses)) + (1 if case.closes else 0)
    responses, raw, closed = raw_exchange(
        proxy.port, payload, chunks=chunks, expect=expect, timeout=3.0
    )
    statuses = tuple(r.status for r in responses)

    if case.statuses:
        assert statuses == case.statuses, (statuses, raw[:300])
    else:
        # Either refused with a 4xx or the connection is closed without a response.
        assert all(400 <= s < 500 for s in statuses), (statuses, raw[:300])
        assert statuses or closed or raw == b"", raw[:300]
    if case.closes:
        assert closed, "the proxy kept a connection open after a framing error"

    # The upstream saw exactly the authorised requests of this case, nothing smuggled.
    received = proxy.upstream.messages[upstream_before:]
    assert [(m.method, m.target) for m in received] == list(case.reaches), received
    for message in received:
        assert message.header("Authorization") == []
        assert message.header("Upgrade") == []
        assert message.header("X-Nhigate-Subject") == [SUBJECT]
    if case.bodies is not None:
        assert tuple(m.body for m in received) == case.bodies
    wire = proxy.upstream.reparse()
    assert [(m.method, m.target, m.body) for m in wire] == [
        (m.method, m.target, m.body) for m in proxy.upstream.messages
    ]
    assert proxy.upstream.parse_errors == []

    # One audit record per answer, parser refusals included.
    records = proxy.audit_records()[audit_before:]
    assert len(records) == len(responses), records
    assert [r["status"] for r in records] == list(statuses)
    if case.audited:
        assert tuple(r["reason"] for r in records) == case.audited
    for record in records:
        assert "a" * 100 not in str(record.get("detail", "")), "audit detail echoes the request"
        assert proxy.token() not in str(record)

    assert proxy.healthy()


def test_parser_refusals_are_audited_without_echoing_the_credential(proxy: ProxyThread) -> None:
    """Regression: requests aiohttp's parser refused (400) used to leave no audit record."""
    token = proxy.token()
    before = len(proxy.audit_records())
    request = _b(_req("GET", "/admin", None, f"Authorization : Bearer {token}"))
    responses, _, _ = raw_exchange(proxy.port, request)
    assert [r.status for r in responses] == [400]
    records = proxy.audit_records()[before:]
    assert len(records) == 1
    record = records[0]
    assert record["decision"] == "deny"
    assert record["reason"] == "request_rejected"
    assert record["status"] == 400
    assert record["detail"].startswith("refused by the HTTP parser")
    assert token not in str(record)
    assert token[:40] not in str(record)
    assert record["policy_version"] == proxy.holder.current.version  # type: ignore[union-attr]
    assert record["request_id"]


def test_counts() -> None:
    print(f"smuggling: {len(CASES)} shapes")
    assert len(CASES) >= 40
