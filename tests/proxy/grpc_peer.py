"""A real gRPC peer for tests and bench/: the Echo test service on grpcio's asyncio server.

The stubs are generated from `protos/nhigate_echo.proto` with grpc_tools.protoc when first
asked for, into a temporary directory (no generated code is committed):

    pb2, pb2_grpc = load_test_service()
    server, port = await start_grpc_server()            # h2c on 127.0.0.1
    server, port = await start_grpc_server(tls=grpc.ssl_server_credentials([(key, cert)]))
    ...
    await server.stop(None)

`grpc_frame` / `grpc_messages` are gRPC's message framing (a 5-byte prefix: compressed flag
and big-endian length), for clients that speak HTTP/2 directly. Also runnable as a process
(`python tests/proxy/grpc_peer.py --port N`, prints `ready`), for benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime
import functools
import importlib.util
import ipaddress
import shutil
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

PROTO = Path(__file__).resolve().parent / "protos" / "nhigate_echo.proto"
SERVICE = "nhigate.test.Echo"
"""The full service name: methods are `POST /nhigate.test.Echo/<Method>`."""

_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


@functools.cache
def load_test_service() -> tuple[ModuleType, ModuleType]:
    """The generated (messages, services) modules of the Echo service."""
    import grpc_tools
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="nhigate-grpc-stubs-"))
    atexit.register(shutil.rmtree, out, True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed ({status}) on {PROTO}")
    modules = []
    for name in ("nhigate_echo_pb2", "nhigate_echo_pb2_grpc"):
        # The services module imports the messages one by its bare name: register both.
        spec = importlib.util.spec_from_file_location(name, out / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


@dataclass
class EchoStats:
    """What the server saw: calls started and the most that ran at once."""

    calls: int = 0
    active: int = 0
    max_active: int = 0

    def enter(self) -> None:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    def leave(self) -> None:
        self.active -= 1


def _servicer(stats: EchoStats) -> Any:
    pb2, pb2_grpc = load_test_service()

    async def maybe_fail(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if request.fail_code:
            await context.abort(
                _STATUS_BY_CODE[request.fail_code], f"asked to fail: {request.text}"
            )

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc, name-defined]
        async def Unary(self, request: Any, context: Any) -> Any:
            stats.enter()
            try:
                await maybe_fail(request, context)
                if request.count:
                    await asyncio.sleep(request.count / 1000)
                return pb2.EchoReply(text=request.text, payload=request.payload)
            finally:
                stats.leave()

        async def ServerStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
            stats.enter()
            try:
                for index in range(request.count):
                    yield pb2.EchoReply(text=f"{request.text}-{index}", index=index)
                await maybe_fail(request, context)
            finally:
                stats.leave()

        async def ClientStream(self, requests: AsyncIterator[Any], context: Any) -> Any:
            stats.enter()
            try:
                texts, size = [], 0
                async for request in requests:
                    texts.append(request.text)
                    size += len(request.payload)
                return pb2.EchoReply(text=",".join(texts), index=size)
            finally:
                stats.leave()

        async def Bidi(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            stats.enter()
            try:
                index = 0
                async for request in requests:
                    yield pb2.EchoReply(text=request.text, payload=request.payload, index=index)
                    index += 1
            finally:
                stats.leave()

    return Echo()


async def start_grpc_server(
    tls: grpc.ServerCredentials | None = None,
    *,
    stats: EchoStats | None = None,
    options: Sequence[tuple[str, Any]] = (),
    port: int = 0,
) -> tuple[grpc.aio.Server, int]:
    """The Echo service listening on 127.0.0.1 (TLS with `tls`, else h2c); stop it with
    `await server.stop(None)`. `options` are grpcio channel arguments, e.g.
    `("grpc.max_concurrent_streams", 2)`."""
    _, pb2_grpc = load_test_service()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
            *options,
        ]
    )
    pb2_grpc.add_EchoServicer_to_server(_servicer(stats or EchoStats()), server)
    address = f"127.0.0.1:{port}"
    bound = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    await server.start()
    return server, bound


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_messages(body: bytes) -> list[bytes]:
    """Split a complete gRPC body into its messages (uncompressed only)."""
    messages, offset = [], 0
    while offset < len(body):
        flag, length = struct.unpack_from(">BI", body, offset)
        if flag != 0:
            raise ValueError("compressed gRPC message")
        start = offset + 5
        if start + length > len(body):
            raise ValueError("truncated gRPC message")
        messages.append(body[start : start + length])
        offset = start + length
    return messages


def self_signed_cert() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 (valid one hour) and its key, both PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def main(argv: list[str] | None = None) -> None:
    """Serve the Echo service (h2c) until killed: `--port N`; prints `ready` once listening."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    async def serve() -> None:
        server, _ = await start_grpc_server(port=args.port)
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
