"""`server.serve` with `upstream_protocol="http2"` under uvloop, as `nhigate proxy` runs it:
the listener's TLS context offers ALPN `h2` only, uvloop's TLS transport is handed to the
HTTP/2 protocol, h2c works on a plaintext listener, and shutdown closes every transport
(a leaked one fails the session: warnings are errors)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import orjson
import uvloop
from pki import make_pki
from test_http2_attacks import RawClient, start_backend

from nhigate.proxy.policy_source import PolicyHolder
from nhigate.proxy.server import serve
from nhigate.proxy.settings import ProxySettings, Upstream


def _run(kit: Any, signing_key: Any, tmp_path: Path, *, tls: bool) -> list[dict[str, Any]]:
    pki = make_pki(tmp_path, "spiffe://example.org/ns/ci/sa/deployer")
    audit = tmp_path / "audit.log"
    answers: dict[str, Any] = {}

    async def scenario() -> None:
        backend = await start_backend()
        holder = PolicyHolder()
        holder.swap(kit.build_policy(signing_key, kit.default_grants))
        settings = ProxySettings(
            upstream=Upstream("http", "127.0.0.1", backend.port),
            listen_port=0,
            admin_port=0,
            audit_log=str(audit),
            upstream_protocol="http2",
            tls_cert=pki.server_cert if tls else None,
            tls_key=pki.server_key if tls else None,
            drain_timeout=2.0,
        )
        stop = asyncio.Event()
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve(settings, stop, holder=holder, on_started=lambda p, _: started.set_result(p))
        )
        port = await asyncio.wait_for(started, 10)
        context = None
        if tls:
            context = ssl.create_default_context(cafile=str(pki.ca_file))
            context.set_alpn_protocols(["h2", "http/1.1"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        if tls:
            answers["alpn"] = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        client = RawClient(reader, writer)
        client.conn.initiate_connection()
        client.flush()
        token = kit_token(kit, signing_key)
        sid = client.request(token=token)
        answer = await client.answer(sid)
        answers["status"] = answer.status
        answers["body"] = answer.body
        denied = client.request(b"/admin", token=token)
        answers["denied"] = (await client.answer(denied)).status
        stop.set()
        await client.pump(lambda: client.goaway is not None)
        answers["goaway"] = client.goaway is not None
        await client.close()
        await asyncio.wait_for(task, 10)
        assert backend.server is not None
        backend.server.close()
        await backend.server.wait_closed()
        answers["backend_paths"] = [dict(s)[b":path"] for s in backend.streams]

    uvloop.run(scenario())
    assert answers["status"] == 200
    assert answers["body"] == b"echo:"
    assert answers["denied"] == 403
    assert answers["goaway"]
    assert answers["backend_paths"] == [b"/v1/items/1"]
    if tls:
        assert answers["alpn"] == "h2"
    return [orjson.loads(line) for line in audit.read_bytes().splitlines()]


def kit_token(kit: Any, signing_key: Any) -> str:
    import time

    from jwt_factory import claims_for, sign

    return str(
        sign(signing_key, claims_for(kit.issuer, kit.audience, "ci-deployer", now=time.time()))
    )


def test_serve_h2c_under_uvloop(kit: Any, signing_key: Any, tmp_path: Path) -> None:
    records = _run(kit, signing_key, tmp_path, tls=False)
    assert [(r["decision"], r["status"]) for r in records] == [("allow", 200), ("deny", 403)]


def test_serve_tls_alpn_h2_under_uvloop(kit: Any, signing_key: Any, tmp_path: Path) -> None:
    records = _run(kit, signing_key, tmp_path, tls=True)
    assert [(r["decision"], r["status"]) for r in records] == [("allow", 200), ("deny", 403)]
