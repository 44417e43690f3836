"""Real gRPC peers through the proxy: grpcio client -> nhigate (HTTP/2) -> grpcio server.

The Echo service (tests/proxy/grpc_peer.py) has one method of each kind; grants name
methods as `POST /nhigate.test.Echo/<Method>`. Covered: unary, server, client and bidi
streaming allowed; UNAUTHENTICATED, PERMISSION_DENIED and RESOURCE_EXHAUSTED with their
messages; a message larger than the 64 KiB flow-control window; the caller's
`authorization` never reaching the backend and proxy-owned metadata not forgeable; custom
trailing metadata and backend errors relayed; TLS with ALPN h2; mTLS with a SPIFFE ID.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from grpc_peer import SERVICE, load_test_service, start_grpc_server
from pki import Pki, make_pki

from nhigate.policy import Grant, RateLimit, Rule, SpiffeSubject
from nhigate.proxy.aiohttp_seam import bound_port
from nhigate.proxy.server import server_ssl_context
from nhigate.proxy.state import STATE

METHODS = ("Unary", "ServerStream", "ClientStream", "Bidi")


def echo_grants(kit: Any, *, methods: tuple[str, ...] = METHODS, **kw: Any) -> tuple[Grant, ...]:
    paths = tuple(f"/{SERVICE}/{m}" for m in methods)
    return (kit.grant("echo", "ci-deployer", paths, frozenset({"POST"}), **kw),)


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    server, port = await start_grpc_server()
    yield port
    await server.stop(None)


@pytest.fixture
async def grpc_proxy(kit: Any, echo_server: int, signing_key: Any) -> AsyncIterator[Any]:
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{echo_server}",
        key=signing_key,
        policy_grants=None,
        upstream_protocol="http2",
    )
    harness.set_policy(echo_grants(kit))
    harness.target = harness.url.removeprefix("http://")
    yield harness
    await harness.session.close()
    await runner.cleanup()


def metadata(harness: Any, **extra: Any) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {harness.token(**extra)}"),)


async def test_unary_and_streaming_calls_are_allowed(grpc_proxy: Any) -> None:
    pb2, pb2_grpc = load_test_service()
    async with grpc.aio.insecure_channel(grpc_proxy.target) as channel:
        stub = pb2_grpc.EchoStub(channel)
        md = metadata(grpc_proxy)
        reply = await stub.Unary(pb2.EchoRequest(text="hi"), metadata=md)
        assert reply.text == "hi"
        replies = [
            r.text async for r in stub.ServerStream(pb2.EchoRequest(text="s", count=5), metadata=md)
        ]
        assert replies == [f"s-{i}" for i in range(5)]

        async def requests() -> AsyncIterator[Any]:
            for i in range(4):
                yield pb2.EchoRequest(text=str(i), payload=b"p" * 10)

        reply = await stub.ClientStream(requests(), metadata=md)
        assert (reply.text, reply.index) == ("0,1,2,3", 40)
        call = stub.Bidi(metadata=md)
        for i in range(3):
            await call.write(pb2.EchoRequest(text=f"b{i}"))
            answer = await call.read()
            assert (answer.text, answer.index) == (f"b{i}", i)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    records = await grpc_proxy.wait_audit(4)
    assert [(r["decision"], r["grpc_method"], r["grpc_status"]) for r in records] == [
        ("allow", m, 0) for m in METHODS
    ]
    assert {r["grpc_service"] for r in records} == {SERVICE}


async def test_messages_larger_than_the_flow_control_window(grpc_proxy: Any) -> None:
    pb2, pb2_grpc = load_test_service()
    payload = bytes(range(256)) * 4096  # 1 MiB, 16 windows of 64 KiB
    async with grpc.aio.insecure_channel(grpc_proxy.target) as channel:
        stub = pb2_grpc.EchoStub(channel)
        reply = await stub.Unary(
            pb2.EchoRequest(text="big", payload=payload), metadata=metadata(grpc_proxy)
        )
        assert reply.payload == payload
        call = stub.Bidi(metadata=metadata(grpc_proxy))
        for _ in range(3):
            await call.write(pb2.EchoRequest(payload=payload))
            assert (await call.read()).payload == payload
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("md", "method", "code", "reason"),
    [
        ("none", "Unary", grpc.StatusCode.UNAUTHENTICATED, "credential_missing"),
        ("bad", "Unary", grpc.StatusCode.UNAUTHENTICATED, "token_malformed"),
        ("good", "Missing", grpc.StatusCode.PERMISSION_DENIED, "no_matching_grant"),
    ],
)
async def test_denials_are_grpc_statuses_with_messages(
    grpc_proxy: Any, md: str, method: str, code: grpc.StatusCode, reason: str
) -> None:
    pb2, _ = load_test_service()
    sent: tuple[tuple[str, str], ...] = ()
    if md == "bad":
        sent = (("authorization", "Bearer not-a-jwt"),)
    elif md == "good":
        sent = metadata(grpc_proxy)
    async with grpc.aio.insecure_channel(grpc_proxy.target) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=pb2.EchoRequest.SerializeToString,
            response_deserializer=pb2.EchoReply.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(pb2.EchoRequest(text="x"), metadata=sent)
    assert raised.value.code() == code
    assert reason in (raised.value.details() or "")
    record = (await grpc_proxy.wait_audit(1))[-1]
    assert (record["decision"], record["reason"]) == ("deny", reason)
    assert (record["grpc_service"], record["grpc_method"]) == (SERVICE, method)
    assert record["grpc_status"] == code.value[0]


async def test_rate_limit_is_resource_exhausted(grpc_proxy: Any, kit: Any) -> None:
    pb2, pb2_grpc = load_test_service()
    grpc_proxy.set_policy(echo_grants(kit, rate_limit=RateLimit(requests_per_second=0.01, burst=2)))
    async with grpc.aio.insecure_channel(grpc_proxy.target) as channel:
        stub = pb2_grpc.EchoStub(channel)
        for _ in range(2):
            await stub.Unary(pb2.EchoRequest(text="ok"), metadata=metadata(grpc_proxy))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Unary(pb2.EchoRequest(text="no"), metadata=metadata(grpc_proxy))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate_limited" in (raised.value.details() or "")
    record = (await grpc_proxy.wait_audit(3))[-1]
    assert (record["reason"], record["status"], record["grpc_status"]) == ("rate_limited", 429, 8)


async def test_backend_errors_travel_in_trailers(grpc_proxy: Any) -> None:
    pb2, pb2_grpc = load_test_service()
    async with grpc.aio.insecure_channel(grpc_proxy.target) as channel:
        stub = pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Unary(
                pb2.EchoRequest(text="t", fail_code=grpc.StatusCode.NOT_FOUND.value[0]),
                metadata=metadata(grpc_proxy),
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert raised.value.details() == "asked to fail: t"
        call = stub.ServerStream(
            pb2.EchoRequest(text="s", count=2, fail_code=grpc.StatusCode.ABORTED.value[0]),
            metadata=metadata(grpc_proxy),
        )
        assert [r.text async for r in _until_error(call)] == ["s-0", "s-1"]
        assert await call.code() == grpc.StatusCode.ABORTED
    records = await grpc_proxy.wait_audit(2)
    assert [r["grpc_status"] for r in records] == [5, 10]
    assert all(r["decision"] == "allow" for r in records)


async def _until_error(call: Any) -> AsyncIterator[Any]:
    try:
        async for reply in call:
            yield reply
    except grpc.aio.AioRpcError:
        return


# -- metadata: what the backend sees, what comes back ------------------------------------


@dataclass
class Probe:
    port: int
    seen: list[tuple[tuple[str, str | bytes], ...]]


@pytest.fixture
async def probe_server() -> AsyncIterator[Probe]:
    """A grpcio server whose one method records the metadata it received and answers with
    custom trailing metadata."""
    seen: list[tuple[tuple[str, str | bytes], ...]] = []

    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.append(tuple(context.invocation_metadata() or ()))
        context.set_trailing_metadata((("x-trailer", "kept"), ("x-bin-bin", b"\x00\x01")))
        return b"pong:" + request

    handler = grpc.method_handlers_generic_handler(
        "probe.Meta", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Probe(port, seen)
    await server.stop(None)


async def test_credentials_stripped_owned_metadata_not_forgeable_trailers_intact(
    kit: Any, probe_server: Probe, signing_key: Any
) -> None:
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{probe_server.port}",
        key=signing_key,
        policy_grants=(kit.grant("probe", "ci-deployer", ("/probe.Meta/*",), frozenset({"POST"})),),
        upstream_protocol="http2",
    )
    try:
        async with grpc.aio.insecure_channel(harness.url.removeprefix("http://")) as channel:
            call = channel.unary_unary("/probe.Meta/Call")
            forged = (
                ("authorization", f"Bearer {harness.token()}"),
                ("x-nhigate-subject", "admin"),
                ("x-nhigate-grant", "everything"),
                ("x-request-id", "forged"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-app", "kept"),
            )
            reply = call(b"ping", metadata=forged)
            assert await reply == b"pong:ping"
            trailing = dict(await reply.trailing_metadata() or ())
            assert trailing["x-trailer"] == "kept"
            assert trailing["x-bin-bin"] == b"\x00\x01"
    finally:
        await harness.session.close()
        await runner.cleanup()
    (seen,) = probe_server.seen
    names = [name for name, _ in seen]
    assert "authorization" not in names
    values = dict(seen)
    assert values["x-nhigate-subject"] == "ci-deployer"
    assert values["x-nhigate-grant"] == "probe"
    assert names.count("x-nhigate-subject") == 1
    assert values["x-request-id"] != "forged"
    assert values["x-forwarded-for"] == "127.0.0.1"
    assert values["x-app"] == "kept"


# -- TLS and mTLS --------------------------------------------------------------------------


SPIFFE_ID = "spiffe://example.org/ns/ci/sa/deployer"


@pytest.fixture
async def tls_proxy(
    kit: Any, echo_server: int, signing_key: Any, tmp_path: Path
) -> AsyncIterator[tuple[Any, str, Pki]]:
    pki = make_pki(tmp_path, SPIFFE_ID)
    harness, runner = await kit.start_proxy(
        f"http://127.0.0.1:{echo_server}",
        key=signing_key,
        policy_grants=None,
        upstream_protocol="http2",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        client_ca=pki.ca_file,
    )
    settings = harness.app[STATE].settings
    context = server_ssl_context(settings)
    assert context is not None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    grants = (
        *echo_grants(kit, methods=("Unary",)),
        Grant(
            name="echo-spiffe",
            subjects=(SpiffeSubject(spiffe_id=SPIFFE_ID),),
            rules=(Rule(methods=frozenset({"POST"}), paths=(f"/{SERVICE}/ServerStream",)),),
        ),
    )
    harness.set_policy(grants)
    yield harness, f"127.0.0.1:{bound_port(site)}", pki
    await harness.session.close()
    await runner.cleanup()


async def test_tls_with_alpn_h2_and_a_token(tls_proxy: tuple[Any, str, Pki]) -> None:
    harness, target, pki = tls_proxy
    pb2, pb2_grpc = load_test_service()
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = pb2_grpc.EchoStub(channel)
        reply = await stub.Unary(pb2.EchoRequest(text="tls"), metadata=metadata(harness))
        assert reply.text == "tls"
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # no client cert, no token
            await stub.Unary(pb2.EchoRequest(text="anon"))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # ALPN offers h2 only: an HTTP/1.1-only TLS client cannot agree on a protocol.
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection(*target.split(":"), ssl=context)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    writer.close()
    await writer.wait_closed()


async def test_mtls_spiffe_id_authenticates_over_http2(tls_proxy: tuple[Any, str, Pki]) -> None:
    harness, target, pki = tls_proxy
    pb2, pb2_grpc = load_test_service()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert
    )
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = pb2_grpc.EchoStub(channel)
        replies = [r.text async for r in stub.ServerStream(pb2.EchoRequest(text="m", count=2))]
        assert replies == ["m-0", "m-1"]
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # the SPIFFE grant names one method
            await stub.Unary(pb2.EchoRequest(text="m"))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    records = await harness.wait_audit(2)
    assert records[0]["identity"]["subject"] == SPIFFE_ID
    assert records[0]["identity"]["kind"] == "spiffe"
    assert (records[0]["decision"], records[1]["decision"]) == ("allow", "deny")
