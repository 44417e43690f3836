"""The aiohttp private API the data plane uses (proxy/aiohttp_seam.py): pinned and exercised.

When aiohttp is upgraded, `test_aiohttp_is_the_pinned_version` fails first: re-read each
private name listed in aiohttp_seam's docstring against the new aiohttp source, then bump
the version here by bumping it in pyproject.toml. The other tests run each hook for real.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web, web_protocol
from aiohttp.http_parser import RawRequestMessage

from nhigate.proxy import aiohttp_seam
from nhigate.proxy.aiohttp_seam import (
    AdaptingRunner,
    HeadDeadlineConnection,
    RebuiltServer,
    bound_port,
    refusal_auditing_factory,
    refused_by_parser,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
RECHECK = (
    "AppRunner._make_server, Application._make_request(_cls=), web_protocol.ERROR, "
    "BaseRequest._message and _prepare_hook, BaseSite._server, Server._kwargs/_loop/"
    "_connections, RequestHandler._loop/_waiter/_request_count/_messages/_keepalive/"
    "_force_close/_keepalive_handle/_next_keepalive_close_time/_process_keepalive"
)


def _pinned_aiohttp() -> str:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in dependencies if (m := re.fullmatch(r"aiohttp==(\S+)", d))]
    assert len(pins) == 1, f"pyproject.toml must pin aiohttp exactly once: {dependencies}"
    return pins[0]


def test_aiohttp_is_the_pinned_version() -> None:
    assert aiohttp.__version__ == _pinned_aiohttp() == "3.14.5", (
        f"aiohttp {aiohttp.__version__} (pyproject pins {_pinned_aiohttp()}): the data plane "
        f"uses aiohttp private API; re-check in nhigate/proxy/aiohttp_seam.py: {RECHECK}"
    )


def test_the_private_names_exist() -> None:
    assert isinstance(web_protocol.ERROR, RawRequestMessage)
    assert aiohttp_seam.PARSER_ERROR_MESSAGE is web_protocol.ERROR
    assert "_make_server" in vars(web.BaseRunner) or "_make_server" in vars(web.AppRunner)
    assert "_cls" in web.Application._make_request.__code__.co_varnames
    assert "_prepare_hook" in vars(web.BaseRequest)
    assert "_process_keepalive" in vars(web_protocol.RequestHandler)
    slots = set(web_protocol.RequestHandler.__slots__)
    for name in (
        "_waiter",
        "_request_count",
        "_messages",
        "_keepalive",
        "_force_close",
        "_keepalive_handle",
        "_next_keepalive_close_time",
    ):
        assert name in slots, f"RequestHandler.{name} is gone: re-check HeadDeadlineConnection"


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="routed")


async def _adapted(request: web.BaseRequest) -> web.Response:
    return web.Response(text="adapted")


class _Runner(AdaptingRunner):
    """Serves every request with `_adapted`; parser refusals reported to `refused`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.refused: list[tuple[bool, int, float]] = []

    def adapt(self, server: web.Server) -> web.Server:
        server.request_handler = _adapted
        server.request_factory = refusal_auditing_factory(self.app, self._refusal)
        return server

    def _refusal(self, request: web.BaseRequest, response: web.StreamResponse, s: float) -> None:
        self.refused.append((refused_by_parser(request), response.status, s))


@pytest.fixture
async def served() -> AsyncIterator[tuple[_Runner, int]]:
    app = web.Application()
    app.router.add_get("/", _ok)
    runner = _Runner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner, bound_port(site)
    await runner.cleanup()


async def _send(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5.0)
    finally:
        writer.close()


async def test_adapted_server_serves_and_the_bound_port_is_found(
    served: tuple[_Runner, int],
) -> None:
    runner, port = served
    assert port > 0
    answer = await _send(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"adapted")
    assert runner.refused == []  # a parsed request is not a refusal


async def test_parser_refusal_is_built_as_its_own_request_and_reported(
    served: tuple[_Runner, int],
) -> None:
    runner, port = served
    answer = await _send(port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400")  # the placeholder message is HTTP/1.0
    assert [(is_refusal, status) for is_refusal, status, _ in runner.refused] == [(True, 400)]
    assert 0.0 <= runner.refused[0][2] < 5.0


_SEEN: list[tuple[bool, bool]] = []
"""(partial, first) of each `deadline_passed` call."""


class _Recording(HeadDeadlineConnection):
    def deadline_passed(self, *, partial: bool, first: bool, waited: float) -> None:
        assert waited >= 0.2
        _SEEN.append((partial, first))


class _Rebuilt(RebuiltServer):
    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        return _Recording(
            self, loop=self.event_loop(), head_timeout=0.2, **self.connection_options()
        )


@pytest.fixture
async def deadline_port() -> AsyncIterator[tuple[_Rebuilt, int]]:
    _SEEN.clear()
    original = web.Server(_adapted, access_log=None)
    rebuilt = _Rebuilt(original, keepalive_timeout=0.4)
    assert rebuilt.connection_options() == {"access_log": None, "keepalive_timeout": 0.4}
    assert rebuilt.event_loop() is asyncio.get_running_loop()
    assert rebuilt.request_handler is _adapted
    loop = asyncio.get_running_loop()
    server = await loop.create_server(rebuilt, "127.0.0.1", 0)
    yield rebuilt, server.sockets[0].getsockname()[1]
    server.close()
    await rebuilt.shutdown(1.0)
    await server.wait_closed()


async def _wait_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(65536), 3.0)


async def test_silent_connection_hits_the_head_deadline(
    deadline_port: tuple[_Rebuilt, int],
) -> None:
    rebuilt, port = deadline_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    assert rebuilt.connection_count() == 1
    assert await _wait_closed(reader) == b""  # closed, nothing said
    writer.close()
    assert _SEEN == [(False, True)]
    assert rebuilt.connection_count() == 0


async def test_partial_head_hits_the_head_deadline(deadline_port: tuple[_Rebuilt, int]) -> None:
    _, port = deadline_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost")
    await writer.drain()
    await _wait_closed(reader)
    writer.close()
    assert _SEEN == [(True, True)]


async def test_kept_alive_connection_hits_the_idle_deadline(
    deadline_port: tuple[_Rebuilt, int],
) -> None:
    _, port = deadline_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"adapted"), 3.0)
    assert answer.startswith(b"HTTP/1.1 200")
    await _wait_closed(reader)  # the idle timeout (0.4 s), after the response
    writer.close()
    assert _SEEN == [(False, False)]


def test_no_other_module_uses_aiohttp_private_api() -> None:
    source = Path(aiohttp_seam.__file__).resolve().parent.parent
    private = re.compile(
        r"\b(web_protocol|RequestHandler|_make_server|_kwargs|_make_request|_prepare_hook"
        r"|_server|_connections|_process_keepalive|_keepalive_handle|_request_count"
        r"|_next_keepalive_close_time|_messages|_force_close)\b|\"_message\""
    )
    offenders = [
        f"{path.relative_to(source)}:{number}: {line.strip()}"
        for path in sorted(source.rglob("*.py"))
        if path.name != "aiohttp_seam.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert offenders == [], "aiohttp private API belongs in proxy/aiohttp_seam.py"
