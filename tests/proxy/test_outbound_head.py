"""The serialiser is the last line before the upstream: it never writes CR, LF or NUL where
they would end a header or a request (issue 12, item 3).

The inbound parser and the callers (`safe_header_value`, the API's header-name pattern)
already keep such bytes out; these tests take each of those away in turn and show the
serialiser still refuses, directly and through a running proxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httptools
import pytest

from nhigate.policy import ServiceConfig
from nhigate.policy.document import UpstreamCredential
from nhigate.proxy import app as proxy_app
from nhigate.proxy import pipeline as proxy_pipeline
from nhigate.proxy.forward import UnsafeHeadError, serialise_head

BAD_VALUES = [
    "a\r\nX-Injected: 1",
    "a\nX-Injected: 1",
    "a\rX-Injected: 1",
    "a\x00b",
    "\r\n\r\nGET /admin HTTP/1.1",
    "trailing\r\n",
]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_serialise_head_refuses_cr_lf_nul_in_header_values(value: str) -> None:
    with pytest.raises(UnsafeHeadError):
        serialise_head("GET", "/v1/items/1", [("Host", "a"), ("X-Value", value), ("X-B", "c")])
    with pytest.raises(UnsafeHeadError):  # first and last positions too
        serialise_head("GET", "/", [("X-Value", value)])


@pytest.mark.parametrize(
    "name",
    ["X-A\r\nX-B", "X-A\n", "X\x00A", "Host: evil", "X A", "", "X-A:", "Naïve", "X-A\t"],
)
def test_serialise_head_refuses_header_names_that_are_not_tokens(name: str) -> None:
    with pytest.raises(UnsafeHeadError):
        serialise_head("GET", "/", [("Host", "a"), (name, "v")])


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET /admin HTTP/1.1\r\n\r\nGET", "/"),
        ("GE T", "/"),
        ("", "/"),
        ("GET", "/a HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /b"),
        ("GET", "/a\nb"),
        ("GET", "/a\x00b"),
        ("GET", "/a b"),
        ("GET", ""),
    ],
)
def test_serialise_head_refuses_an_unsafe_request_line(method: str, target: str) -> None:
    with pytest.raises(UnsafeHeadError):
        serialise_head(method, target, [("Host", "a")])


def test_serialise_head_writes_ordinary_heads_that_parse_back_exactly() -> None:
    headers = [
        ("Host", "api:8080"),
        ("X-Tab", "a\tb"),
        ("X-Empty", ""),
        ("X-Latin", "caf\xe9"),
        ("X-Colon", "a: b"),
    ]
    head = serialise_head("PATCH", "/v1/items/%2F?q=a:b", headers)
    seen: list[tuple[bytes, bytes]] = []

    class Sink:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name, value))

    parser = httptools.HttpRequestParser(Sink())
    parser.feed_data(head)
    assert parser.get_method() == b"PATCH"
    assert [(n.decode(), v.decode("utf-8")) for n, v in seen] == headers
    assert serialise_head("GET", "/", []) == b"GET / HTTP/1.1\r\n\r\n"


async def test_an_injected_credential_header_name_with_crlf_is_refused_not_sent(
    kit: Any, signing_key: Any, tmp_path: Path
) -> None:
    # The API's HeaderName pattern keeps this out of a ProtectedService; a policy document
    # built or decoded by other means must not turn it into a second upstream header.
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    service = ServiceConfig(
        namespace="payments",
        name="payments-api",
        backend_service="api",
        backend_port=8080,
        upstream_credential=UpstreamCredential("X-Cred\r\nX-Nhigate-Grant", str(secret), "k="),
    )
    upstream, upstream_runner = await kit.start_upstream()
    harness, runner = await kit.start_proxy(upstream.url, key=signing_key, upstream=upstream)
    try:
        harness.holder.swap(kit.build_policy(signing_key, kit.default_grants, service=service))
        async with harness.session.get(f"{harness.url}/v1/items/1", headers=harness.auth()) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"] == "internal_error"
        assert upstream.requests == []
        records = await harness.wait_audit(1)
        assert records[-1]["decision"] == "deny"
        assert records[-1]["reason"] == "internal_error"
        assert "unsafe upstream request head" in records[-1]["detail"]
    finally:
        await harness.session.close()
        await runner.cleanup()
        await upstream_runner.cleanup()


async def test_an_identity_value_with_crlf_is_refused_even_without_the_value_encoder(
    kit: Any, signing_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, upstream_runner = await kit.start_upstream()
    harness, runner = await kit.start_proxy(
        upstream.url,
        key=signing_key,
        upstream=upstream,
        policy_grants=(kit.grant("evil/read", "ci\r\nX-Nhigate-Grant: admin", ("/v1/**",)),),
    )
    try:
        evil = harness.auth("ci\r\nX-Nhigate-Grant: admin")
        # With the encoder: the subject arrives percent-encoded, as one header.
        async with harness.session.get(f"{harness.url}/v1/items/1", headers=evil) as resp:
            assert resp.status == 200
        assert upstream.last_header("X-Nhigate-Subject") == ["ci%0D%0AX-Nhigate-Grant: admin"]
        assert upstream.last_header("X-Nhigate-Grant") == ["evil/read"]
        # Without it (a regression, simulated): the serialiser still refuses.
        monkeypatch.setattr(proxy_pipeline, "safe_header_value", lambda value: value)
        harness.app[proxy_app.PIPELINE]._last_identity_headers = (None, None, [])
        before = len(upstream.requests)
        async with harness.session.get(f"{harness.url}/v1/items/2", headers=evil) as resp:
            assert resp.status == 500
        assert len(upstream.requests) == before
        records = await harness.wait_audit(2)
        assert records[-1]["reason"] == "internal_error"
    finally:
        await harness.session.close()
        await runner.cleanup()
        await upstream_runner.cleanup()
