"""What an HTTP server layer costs per request, before any proxy work (issue 16).

Each layer answers every request with 200 and a small JSON body; nothing else runs in it:

- `aiohttp`: aiohttp's low-level `aiohttp.web.Server` (no router, no web app), on uvloop,
  as nhigate serves its proxy;
- `protocol`: a bare `asyncio.Protocol` on uvloop parsing with httptools (llhttp), the floor
  for an HTTP/1.1 front end of our own in this runtime;
- `granian`: granian's RSGI interface (Rust hyper server, embedded in the process, one
  runtime thread, the Python side on uvloop), HTTP/1.1;
- `h2`: the `h2` library's server state machine on an `asyncio.Protocol` on uvloop,
  HTTP/2 cleartext (prior knowledge), many streams over one connection;
- `nginx`: `return 200` (one worker), the reference.

Two figures per layer:

- **instructions per request** (`--instructions N`): the server runs under valgrind's
  callgrind; after a warm-up its counters are zeroed (`callgrind_control -z`), `N`
  requests are sent by a client in this process (HTTP/1.1: one after another on one
  keep-alive connection; h2: `--streams` concurrent streams on one connection), then the
  counters are dumped. User-space only (kernel socket work is not counted), and the same
  on a loaded machine as on a quiet one.
- **CPU µs per request** (`--seconds S`): the server pinned to CPU 0 with taskset, the
  load generator (wrk, `-c 32`; for h2 h2load, 32 streams on 1 connection) on CPU 1;
  CPU = user + system of the server process from /proc over the run, divided by the
  requests served. Indicative: on a shared machine it moves with the load.

    .venv/bin/python bench/server_layers.py --instructions 2000 --seconds 4 [--json out.json]
    .venv/bin/python bench/server_layers.py --only protocol,granian --instructions 2000

Everything listens on 127.0.0.1, every child has a time limit, and every process started
is stopped by its PID. Needs valgrind, wrk, nginx and h2load (Debian: valgrind, wrk, nginx,
nghttp2-client) and, for `granian`, granian in the venv (`pip install granian==2.8.9`; not
a dependency of nhigate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

SERVER_CPU = "0"
LOAD_CPU = "1"
BODY = b'{"ok":true}'
LAYERS = ("aiohttp", "protocol", "granian", "h2", "nginx")
HTTP1_REQUEST = b"GET /v1/items/123 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"
CHILD_LIMIT = 900.0
"""Seconds a serving child lives at most, whatever happens to this process."""


# -- the servers (each runs in a child process: `--serve LAYER PORT`) ----------------------


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = web.Server(handler)
        await loop.create_server(server, "127.0.0.1", port)
        await asyncio.sleep(CHILD_LIMIT)

    uvloop.run(main())


def serve_protocol(port: int) -> None:
    import httptools
    import uvloop

    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
    )

    class Http1(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.parser = httptools.HttpRequestParser(self)
            self.headers: list[tuple[bytes, bytes]] = []

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_message_complete(self) -> None:
            self.headers = []
            self.transport.write(response)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Http1, "127.0.0.1", port)
        await asyncio.sleep(CHILD_LIMIT)

    uvloop.run(main())


def serve_granian(port: int) -> None:
    import uvloop
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    headers = [("content-type", "application/json")]

    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(200, headers, BODY)

    async def main() -> None:
        server = Server(
            app,
            address="127.0.0.1",
            port=port,
            interface=Interfaces.RSGI,
            http=HTTPModes.http1,
            runtime_threads=1,
            websockets=False,
            log_enabled=False,
        )
        task = asyncio.create_task(server.serve())
        await asyncio.sleep(CHILD_LIMIT)
        server.stop()  # type: ignore[no-untyped-call]
        await task

    uvloop.run(main())


def serve_h2(port: int) -> None:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import uvloop

    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    headers = [(b":status", b"200"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(BODY)).encode()))

    class Http2(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.conn = h2.connection.H2Connection(config=config)
            self.conn.initiate_connection()
            self.transport.write(self.conn.data_to_send())

        def data_received(self, data: bytes) -> None:
            conn = self.conn
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.transport.write(conn.data_to_send())
                self.transport.close()
                return
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    stream = event.stream_id
                    conn.send_headers(stream, headers)
                    conn.send_data(stream, BODY, end_stream=True)
            out = conn.data_to_send()
            if out:
                self.transport.write(out)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Http2, "127.0.0.1", port)
        await asyncio.sleep(CHILD_LIMIT)

    uvloop.run(main())


SERVERS = {
    "aiohttp": serve_aiohttp,
    "protocol": serve_protocol,
    "granian": serve_granian,
    "h2": serve_h2,
}

NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
}}
"""


# -- starting and stopping -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout:g}s")


def start(
    layer: str, port: int, workdir: Path, wrapper: tuple[str, ...]
) -> subprocess.Popen[bytes]:
    """The layer's server, pinned to the server CPU, optionally under `wrapper` (valgrind)."""
    if layer == "nginx":
        directory = workdir / f"nginx-{port}"
        directory.mkdir()
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        command = [nginx, "-c", str(conf), "-p", str(directory), "-e", "stderr"]
    else:
        command = [sys.executable, __file__, "--serve", layer, str(port)]
    return subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, *wrapper, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- clients for the instruction counts ----------------------------------------------------


def http1_requests(port: int, count: int) -> int:
    """`count` GETs one after another on one keep-alive connection; returns non-200s."""
    failed = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        for _ in range(count):
            sock.sendall(HTTP1_REQUEST)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("server closed the connection")
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    if len(body) >= (int(length.group(1)) if length else 0):
                        break
            failed += not data.startswith(b"HTTP/1.1 200")
    return failed


class H2Client:
    """HTTP/2 prior knowledge over one connection, `streams` requests in flight at a time."""

    def __init__(self, port: int) -> None:
        import h2.config
        import h2.connection

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.headers = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"127.0.0.1"),
            (b":path", b"/v1/items/123"),
            (b"user-agent", b"bench"),
        ]

    def requests(self, count: int, streams: int) -> int:
        import h2.events

        failed = 0
        sent = done = 0
        open_streams: dict[int, bool] = {}
        while done < count:
            while sent < count and len(open_streams) < streams:
                stream = self.conn.get_next_available_stream_id()
                self.conn.send_headers(stream, self.headers, end_stream=True)
                open_streams[stream] = False
                sent += 1
            self.sock.sendall(self.conn.data_to_send())
            data = self.sock.recv(262144)
            if not data:
                raise RuntimeError("server closed the connection")
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    open_streams[event.stream_id] = dict(event.headers)[b":status"] == b"200"
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    failed += not open_streams.pop(event.stream_id)
                    done += 1
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)
        return failed

    def close(self) -> None:
        self.sock.close()


def drive(layer: str, port: int, count: int, streams: int, client: H2Client | None) -> int:
    if layer == "h2":
        assert client is not None
        return client.requests(count, streams)
    return http1_requests(port, count)


def count_instructions(layer: str, workdir: Path, count: int, streams: int) -> dict[str, Any]:
    """User-space instructions per request under callgrind (warm-up, zero, N requests, dump)."""
    out = workdir / f"callgrind-{layer}.out"
    port = free_port()
    wrapper = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p")
    process = start(layer, port, workdir, wrapper)
    control = shutil.which("callgrind_control") or "callgrind_control"
    client = None
    try:
        wait_port(port, process, timeout=300)
        client = H2Client(port) if layer == "h2" else None
        drive(layer, port, 200, streams, client)
        subprocess.run([control, "-z", str(process.pid)], check=True, capture_output=True)
        failed = drive(layer, port, count, streams, client)
        subprocess.run([control, "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        if client is not None:
            client.close()
        stop(process)
    dumps = sorted(workdir.glob(f"callgrind-{layer}.out.*.1"))
    if not dumps:
        raise RuntimeError(f"no callgrind dump for {layer}")
    total = 0
    for dump in dumps:  # one file per thread with --separate-threads; one otherwise
        match = re.search(r"^totals:\s+(\d+)", dump.read_text(errors="replace"), re.M)
        if match is not None:
            total += int(match.group(1))
    return {"instructions_per_request": total / count, "requests": count, "non200": failed}


# -- CPU per request under load ------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_generator(layer: str, port: int, seconds: float, connections: int) -> list[str]:
    url = f"http://127.0.0.1:{port}/v1/items/123"
    if layer == "h2":
        # One connection, `connections` concurrent streams (h2load -m), for `seconds`.
        duration = ["-D", str(int(seconds))]
        return ["h2load", "-c", "1", "-m", str(connections), *duration, url]
    return ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", url]


def served(layer: str, output: str) -> int:
    if layer == "h2":
        match = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", output)
        if match is None:
            raise RuntimeError(f"cannot read h2load's output: {output[-400:]!r}")
        return int(match.group(2))
    match = re.search(r"(\d+) requests in", output)
    if match is None:
        raise RuntimeError(f"cannot read wrk's output: {output[-400:]!r}")
    if "Non-2xx" in output:
        raise RuntimeError(f"non-2xx answers: {output[-400:]!r}")
    return int(match.group(1))


def measure_cpu(layer: str, workdir: Path, seconds: float, connections: int) -> dict[str, Any]:
    port = free_port()
    process = start(layer, port, workdir, ())
    try:
        wait_port(port, process, timeout=30)
        warm = load_generator(layer, port, 1, connections)
        subprocess.run(["taskset", "-c", LOAD_CPU, *warm], capture_output=True, timeout=60)
        before = cpu_seconds(process.pid)
        run = subprocess.run(
            ["taskset", "-c", LOAD_CPU, *load_generator(layer, port, seconds, connections)],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        used = cpu_seconds(process.pid) - before
    finally:
        stop(process)
    requests = served(layer, run.stdout)
    return {
        "requests": requests,
        "rps": requests / seconds,
        "cpu_us_per_request": used / requests * 1e6,
        "rps_per_core": requests / used if used else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(LAYERS), help="comma-separated layers")
    parser.add_argument("--instructions", type=int, metavar="N", help="callgrind over N requests")
    parser.add_argument("--streams", type=int, default=32, help="h2: concurrent streams")
    parser.add_argument("--seconds", type=float, help="CPU per request under wrk for S seconds")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", nargs=2, metavar=("LAYER", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        layer, port = args.serve
        SERVERS[layer](int(port))
        return 0
    layers = [name for name in args.only.split(",") if name]
    unknown = set(layers) - set(LAYERS)
    if unknown:
        parser.error(f"unknown layers: {', '.join(sorted(unknown))}")
    if args.instructions is None and args.seconds is None:
        parser.error("give --instructions N and/or --seconds S")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nhigate-layers-") as tmp:
        for layer in layers:
            row: dict[str, Any] = {}
            if args.instructions:
                row.update(count_instructions(layer, Path(tmp), args.instructions, args.streams))
            if args.seconds:
                row.update(measure_cpu(layer, Path(tmp), args.seconds, args.connections))
            results[layer] = row
            print(layer, json.dumps(row), flush=True)
    if args.json is not None:
        load = os.getloadavg()
        document = {"benchmark": "server_layers", "loadavg": load, "results": results}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
