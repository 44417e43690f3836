"""The bench's peers (bench/peers.py) do the checks the report says they do.

The HAProxy configuration is run for real on 127.0.0.1 (a handful of requests, bounded by
socket timeouts): a bench that compared nhigate with an HAProxy that lets bad tokens through
would flatter HAProxy. oauth2-proxy's flags are checked as text (building it takes minutes).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "proxy"))

from jwt_factory import (  # type: ignore[import-not-found]  # noqa: E402
    TestKey,
    claims_for,
    make_signing_key,
    sign,
)


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = load("peers")
ISSUER = "http://127.0.0.1:1/issuer"
AUDIENCE = "bench-api"
SUBJECT = "client-7"


class RecordingUpstream:
    """Answers 200 and records the Authorization header each request reached it with."""

    def __enter__(self) -> RecordingUpstream:
        seen: list[str | None] = []
        self.seen = seen

        class Answer(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_POST(self) -> None:
                self.do_GET()

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(port: int, path: str, token: str | None, method: str = "GET") -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def key() -> TestKey:
    return make_signing_key("ES256", kid="bench")


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory, key: TestKey) -> Iterator[tuple[int, Any]]:
    """A real HAProxy on the bench configuration, in front of a recording upstream.

    haproxy is a Debian package hack/lib/common.sh installs for the suite.
    """
    workdir = tmp_path_factory.mktemp("haproxy")
    pem = workdir / "issuer.pem"
    pem.write_bytes(key.public_pem())
    with RecordingUpstream() as upstream:
        port = free_port()
        config = peers.haproxy_config(
            port=port,
            upstream=upstream.port,
            pem=pem,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=SUBJECT,
        )
        process = peers.start_haproxy(workdir, config, "0-1")
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    status(port, "/", None)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield port, upstream
        finally:
            process.terminate()
            process.wait(timeout=10)


def token(key: TestKey, **overrides: Any) -> str:
    claims = claims_for(ISSUER, AUDIENCE, SUBJECT, lifetime=300)
    claims.update(overrides)
    return str(sign(key, {k: v for k, v in claims.items() if v is not None}))


def test_haproxy_forwards_a_valid_token_on_the_rule_without_its_authorization(
    haproxy: tuple[int, Any], key: TestKey
) -> None:
    port, upstream = haproxy
    before = len(upstream.seen)
    assert status(port, "/v1/items/123", token(key)) == 200
    assert upstream.seen[before:] == [None]  # the bearer token does not reach the upstream


@pytest.mark.parametrize(
    "case",
    ["no token", "bad signature", "other key", "alg none", "expired", "no exp", "iss", "aud"],
)
def test_haproxy_refuses_a_token_it_cannot_trust_with_401(
    haproxy: tuple[int, Any], key: TestKey, case: str
) -> None:
    port, upstream = haproxy
    good = token(key)
    head, payload, sig = good.split(".")
    bad = {
        "no token": None,
        "bad signature": f"{head}.{payload}.{sig[:-4]}AAAA",
        "other key": token(make_signing_key("ES256", kid="bench")),
        "alg none": sign(key, claims_for(ISSUER, AUDIENCE, SUBJECT), {"alg": "none"}),
        "expired": token(key, exp=int(time.time()) - 5),
        "no exp": token(key, exp=None),
        "iss": token(key, iss="http://127.0.0.1:2/other"),
        "aud": token(key, aud="other-api"),
    }[case]
    before = len(upstream.seen)
    assert status(port, "/v1/items/123", bad) == 401
    assert len(upstream.seen) == before


@pytest.mark.parametrize(
    ("method", "path", "subject"),
    [
        ("GET", "/v1/items/123/more", SUBJECT),
        ("GET", "/v1/other", SUBJECT),
        ("POST", "/v1/items/123", SUBJECT),
        ("GET", "/v1/items/123", "client-8"),
    ],
)
def test_haproxy_refuses_a_valid_token_outside_the_rule_with_403(
    haproxy: tuple[int, Any], key: TestKey, method: str, path: str, subject: str
) -> None:
    port, upstream = haproxy
    before = len(upstream.seen)
    assert status(port, path, token(key, sub=subject), method) == 403
    assert len(upstream.seen) == before


def test_haproxy_config_pins_the_algorithm_and_checks_every_claim_the_report_lists() -> None:
    config = peers.haproxy_config(
        port=1, upstream=2, pem=Path("/k.pem"), issuer=ISSUER, audience=AUDIENCE, subject=SUBJECT
    )
    for needle in (
        "http_auth_bearer",
        "jwt_header_query('$.alg')",
        "{ var(txn.alg) -m str ES256 }",
        'jwt_verify("ES256","/k.pem")',
        f"{{ var(txn.iss) -m str {ISSUER} }}",
        f"{{ var(txn.aud) -m str {AUDIENCE} }}",
        "{ var(txn.exp) -m found }",
        f"acl rule_subject var(txn.sub) -m str {SUBJECT}",
        "acl rule_method method GET",
        "acl rule_path path_reg ^/v1/items/[^/]+$",
        "http-request del-header Authorization",
        "nbthread 1",
    ):
        assert needle in config, needle


def test_oauth2_proxy_accepts_only_bearer_jwts_of_the_bench_issuer_and_audience() -> None:
    args = peers.oauth2_proxy_args(port=1, upstream=2, issuer=ISSUER, audience=AUDIENCE)
    assert "--skip-jwt-bearer-tokens=true" in args
    assert f"--extra-jwt-issuers={ISSUER}={AUDIENCE}" in args
    assert f"--oidc-issuer-url={ISSUER}" in args
    assert f"--client-id={AUDIENCE}" in args
    assert "--upstream=http://127.0.0.1:2/" in args
    assert "--http-address=127.0.0.1:1" in args
    assert "--pass-authorization-header=false" in args


def test_the_oidc_issuer_serves_discovery_naming_itself_and_the_jwks(key: TestKey) -> None:
    import json
    import urllib.request

    jwks = {"keys": [dict(key.public_jwk)]}
    with peers.OidcIssuer(jwks) as issuer:
        url = f"{issuer.issuer}/.well-known/openid-configuration"
        with urllib.request.urlopen(url, timeout=5) as resp:
            discovery = json.load(resp)
        assert discovery["issuer"] == issuer.issuer
        with urllib.request.urlopen(discovery["jwks_uri"], timeout=5) as resp:
            assert json.load(resp) == jwks


def test_ensure_packages_installs_nothing_when_every_command_is_there() -> None:
    # `sh` is on every machine: nothing to install, so no apt-get (and no root) is needed
    peers.ensure_packages({"sh": "dash"})


def test_haproxy_compares_aud_as_one_string_so_an_audience_array_is_refused(
    haproxy: tuple[int, Any], key: TestKey
) -> None:
    # a limit the report states: valid by RFC 7519, refused by this configuration
    port, _ = haproxy
    assert status(port, "/v1/items/123", token(key, aud=[AUDIENCE])) == 401
