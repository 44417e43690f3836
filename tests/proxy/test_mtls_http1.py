"""mTLS over HTTP/1.1 on both front ends: a client certificate's SPIFFE ID is an identity.

The proxied port with `--tls-cert/--tls-key/--client-ca` (certificates optional, verified
against the CA when sent): a SPIFFE grant allows its caller by certificate alone, a bearer
token still decides alone when present, a certificate from another CA fails the handshake,
and neither certificate nor token is a 401. The same over aiohttp's web layer and over the
native front end (http1.py), which reads the certificate from the TLS transport itself.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pki import Pki, make_pki

from nhigate.policy import Grant, Rule, SpiffeSubject
from nhigate.proxy.aiohttp_seam import bound_port
from nhigate.proxy.http1 import NativeRunner
from nhigate.proxy.server import server_ssl_context
from nhigate.proxy.state import STATE

pytestmark = pytest.mark.usefixtures("http1_server")

SPIFFE_ID = "spiffe://example.org/ns/ci/sa/deployer"


def _client(pki: Pki, tmp: Path, *, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if certificate:
        (tmp / "client.pem").write_bytes(pki.client_cert)
        (tmp / "client.key").write_bytes(pki.client_key)
        context.load_cert_chain(str(tmp / "client.pem"), str(tmp / "client.key"))
    return context


@pytest.fixture
async def mtls_proxy(
    kit: Any, upstream: Any, signing_key: Any, tmp_path: Path
) -> AsyncIterator[tuple[Any, str, Pki]]:
    pki = make_pki(tmp_path, SPIFFE_ID)
    harness, runner = await kit.start_proxy(
        upstream.url,
        key=signing_key,
        upstream=upstream,
        policy_grants=None,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        client_ca=pki.ca_file,
    )
    context = server_ssl_context(harness.app[STATE].settings)
    assert context is not None
    tls: Any
    if isinstance(runner, NativeRunner):
        tls = NativeRunner(harness.app)
        tls.front = runner.front  # a TLS listener over the same front end
        port = await tls.start("127.0.0.1", 0, ssl_context=context)
    else:
        tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await tls.start()
        port = bound_port(tls)
    harness.set_policy(
        (
            kit.grant("token-items", "ci-deployer", ("/v1/items/*",), frozenset({"GET"})),
            Grant(
                name="payments/spiffe-reports",
                subjects=(SpiffeSubject(spiffe_id=SPIFFE_ID),),
                rules=(Rule(methods=frozenset({"GET"}), paths=("/v1/reports/*",)),),
            ),
        )
    )
    yield harness, f"https://127.0.0.1:{port}", pki
    if isinstance(tls, NativeRunner):
        assert tls._listener is not None
        tls._listener.close()
    await harness.session.close()
    await runner.cleanup()


async def test_a_client_certificate_spiffe_id_is_authorised_by_its_grant(
    mtls_proxy: tuple[Any, str, Pki], upstream: Any, tmp_path: Path
) -> None:
    harness, url, pki = mtls_proxy
    with_cert = _client(pki, tmp_path, certificate=True)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/reports/q3", ssl=with_cert) as resp:
            assert resp.status == 200
        assert upstream.last_header("X-Nhigate-Subject") == [SPIFFE_ID]
        async with session.get(f"{url}/v1/items/1", ssl=with_cert) as resp:
            assert resp.status == 403  # the SPIFFE grant names reports only
        # A token present decides alone, certificate or not.
        async with session.get(f"{url}/v1/items/1", ssl=with_cert, headers=harness.auth()) as r:
            assert r.status == 200
        assert upstream.last_header("X-Nhigate-Subject") == ["ci-deployer"]
        async with session.get(
            f"{url}/v1/reports/q3", ssl=with_cert, headers=harness.auth()
        ) as resp:
            assert resp.status == 403  # the token's subject has no reports grant
    records = await harness.wait_audit(4)
    assert records[0]["identity"] == {"issuer": "", "subject": SPIFFE_ID, "kind": "spiffe"}
    assert [r["decision"] for r in records] == ["allow", "deny", "allow", "deny"]


async def test_no_certificate_and_no_token_is_401_and_a_foreign_ca_fails_the_handshake(
    mtls_proxy: tuple[Any, str, Pki], upstream: Any, tmp_path: Path
) -> None:
    harness, url, pki = mtls_proxy
    async with aiohttp.ClientSession() as session:
        without = _client(pki, tmp_path, certificate=False)
        async with session.get(f"{url}/v1/reports/q3", ssl=without) as resp:
            assert resp.status == 401
            assert json.loads(await resp.read())["error"] == "credential_missing"
        (tmp_path / "other").mkdir()
        foreign = make_pki(tmp_path / "other", SPIFFE_ID)  # same SPIFFE ID, another CA
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        (tmp_path / "f.pem").write_bytes(foreign.client_cert)
        (tmp_path / "f.key").write_bytes(foreign.client_key)
        context.load_cert_chain(str(tmp_path / "f.pem"), str(tmp_path / "f.key"))
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"{url}/v1/reports/q3", ssl=context) as resp:
                await resp.read()
    assert upstream.requests == []  # nothing reached the backend
    records = await harness.wait_audit(1)
    assert records[0]["reason"] == "credential_missing"
