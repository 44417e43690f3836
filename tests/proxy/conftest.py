"""Fixtures for proxy tests: a real recording upstream, a real proxy, real signed JWTs.

Everything listens on 127.0.0.1 with ephemeral ports. The proxy runs the real
`Authenticator` against an issuer with an inline JWKS (built by jwt_factory),
a policy compiled by the real policy core, and an injectable clock.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from jwt_factory import TestKey, claims_for, jwks_for, make_signing_key, sign

from nhigate.policy import (
    Grant,
    IssuerConfig,
    Policy,
    RateLimit,
    Revocation,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    make_document,
)
from nhigate.proxy.aiohttp_seam import bound_port
from nhigate.proxy.audit import AuditLog
from nhigate.proxy.factory import create_app
from nhigate.proxy.http1 import NativeRunner
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import PolicyHolder
from nhigate.proxy.rejects import rejected_request_audit
from nhigate.proxy.runner import ProxyRunner
from nhigate.proxy.settings import ProxySettings, Upstream

HTTP1_SERVERS = ("aiohttp", "native")
"""The HTTP/1.1 front ends (`--http1-server`); suites that start a real proxy run over each."""

_FRONT = {"server": "aiohttp"}
"""The front end `start_proxy` serves with unless told (set by the `http1_server` fixture)."""

ISSUER = "https://issuer.test"
AUDIENCE = "payments-api"
ISSUER_NAME = "ci"


@dataclass
class Recorded:
    """One request as the upstream saw it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class RecordingUpstream:
    """A real aiohttp upstream that records every request it receives."""

    port: int
    requests: list[Recorded] = field(default_factory=list)
    delay: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def last_header(self, name: str) -> list[str]:
        return [v for k, v in self.requests[-1].headers if k.lower() == name.lower()]


class MutableClock:
    """The proxy's clock in tests: real time plus an offset tests move forward."""

    def __init__(self) -> None:
        import time

        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset


def issuer_config(key: TestKey, **overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {
        "name": ISSUER_NAME,
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "algorithms": ("ES256", "RS256"),
        "max_token_lifetime_seconds": 3600,
        "clock_skew_seconds": 30,
        "jwks": jwks_for(key),
    }
    values.update(overrides)
    return IssuerConfig(**values)


def grant(
    name: str,
    subject: str,
    paths: tuple[str, ...],
    methods: frozenset[str] = frozenset({"GET"}),
    **kw: Any,
) -> Grant:
    return Grant(
        name=name,
        subjects=(TokenSubject(issuer=ISSUER_NAME, subject=subject),),
        rules=(Rule(methods=methods, paths=paths),),
        **kw,
    )


def build_policy(
    key: TestKey,
    grants: tuple[Grant, ...],
    *,
    revocations: tuple[Revocation, ...] = (),
    service: ServiceConfig | None = None,
) -> Policy:
    service = service or ServiceConfig(
        namespace="payments", name="payments-api", backend_service="api", backend_port=8080
    )
    return compile_policy(make_document(service, (issuer_config(key),), grants, revocations))


DEFAULT_GRANTS = (
    grant("payments/read", "ci-deployer", ("/v1/items/**",), frozenset({"GET", "HEAD"})),
    grant("payments/write", "ci-deployer", ("/v1/items/*",), frozenset({"POST", "PUT"})),
)


@dataclass
class ProxyHarness:
    """A running proxy in front of a recording upstream, plus its audit lines."""

    url: str
    upstream: RecordingUpstream
    holder: PolicyHolder
    key: TestKey
    clock: MutableClock
    metrics: ProxyMetrics
    audit: AuditLog
    sink: io.BytesIO
    session: aiohttp.ClientSession
    app: web.Application

    def token(self, sub: str = "ci-deployer", **extra: Any) -> str:
        return sign(self.key, claims_for(ISSUER, AUDIENCE, sub, now=self.clock(), **extra))

    def auth(self, sub: str = "ci-deployer", **extra: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, **extra)}"}

    def audit_records(self) -> list[dict[str, Any]]:
        """Every record written so far (waits for the writer thread to catch up)."""
        self.audit.flush()
        deadline = time.monotonic() + 2.0
        while self.audit.backlog_bytes and time.monotonic() < deadline:
            time.sleep(0.001)
        return [orjson.loads(line) for line in self.sink.getvalue().splitlines() if line]

    async def wait_audit(self, count: int, within: float = 2.0) -> list[dict[str, Any]]:
        """Audit records once at least `count` were written (the writer thread is async)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            records = self.audit_records()
            if len(records) >= count or loop.time() > deadline:
                return records
            await asyncio.sleep(0.01)

    def set_policy(self, grants: tuple[Grant, ...], **kw: Any) -> Policy:
        policy = build_policy(self.key, grants, **kw)
        self.holder.swap(policy)
        return policy


async def start_upstream(
    handler: Callable[[web.Request], Any] | None = None,
) -> tuple[RecordingUpstream, web.AppRunner]:
    """A recording upstream on 127.0.0.1 (`handler` overrides the default echo)."""
    upstream = RecordingUpstream(port=0)

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        upstream.requests.append(
            Recorded(request.method, request.raw_path, list(request.headers.items()), body)
        )
        if upstream.delay:
            await asyncio.sleep(upstream.delay)
        if handler is not None:
            result: web.StreamResponse = await handler(request)
            return result
        return web.json_response({"path": request.raw_path, "len": len(body)})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.port = bound_port(site)
    return upstream, runner


async def start_proxy(
    upstream_url: str,
    *,
    key: TestKey,
    policy_grants: tuple[Grant, ...] | None = DEFAULT_GRANTS,
    upstream: RecordingUpstream | None = None,
    routed: bool = False,
    **settings_kw: Any,
) -> tuple[ProxyHarness, Any]:
    """A real proxy app on 127.0.0.1 with an in-memory audit sink; the runner has `cleanup()`.

    `routed`: served by a plain `web.AppRunner` (through aiohttp's router and the
    pipeline's middleware) instead of `ProxyRunner`. Otherwise the HTTP/1.1 front end is
    `settings_kw["http1_server"]`, else the `http1_server` fixture's (aiohttp by default).
    """
    from urllib.parse import urlsplit

    parts = urlsplit(upstream_url)
    if not routed:
        settings_kw.setdefault("http1_server", _FRONT["server"])
    settings = ProxySettings(
        upstream=Upstream("http", parts.hostname or "127.0.0.1", parts.port or 80),
        listen_port=0,
        admin_port=0,
        **settings_kw,
    )
    holder = PolicyHolder()
    clock = MutableClock()
    metrics = ProxyMetrics()
    sink = io.BytesIO()
    audit = AuditLog(sink)
    app = create_app(settings, holder=holder, metrics=metrics, audit=audit, clock=clock)
    runner: Any
    if settings.http1_server == "native":
        runner = NativeRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        port = await runner.start("127.0.0.1", 0)
    else:
        runner_class = web.AppRunner if routed else ProxyRunner
        runner = runner_class(app, shutdown_timeout=2.0, **rejected_request_audit(app))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = bound_port(site)
    if policy_grants is not None:
        holder.swap(build_policy(key, policy_grants))
    session = aiohttp.ClientSession()
    harness = ProxyHarness(
        url=f"http://127.0.0.1:{port}",
        upstream=upstream or RecordingUpstream(port=parts.port or 0),
        holder=holder,
        key=key,
        clock=clock,
        metrics=metrics,
        audit=audit,
        sink=sink,
        session=session,
        app=app,
    )
    return harness, runner


@pytest.fixture(params=HTTP1_SERVERS)
def http1_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test over each HTTP/1.1 front end: `start_proxy` (and the `proxy` fixture) serve
    with it. Modules opt in with `pytestmark = pytest.mark.usefixtures("http1_server")`."""
    _FRONT["server"] = request.param
    yield request.param
    _FRONT["server"] = "aiohttp"


@pytest.fixture(scope="session")
def signing_key() -> TestKey:
    return make_signing_key("ES256", kid="test-es256")


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recording, runner = await start_upstream()
    yield recording
    await runner.cleanup()


@pytest.fixture
async def proxy(upstream: RecordingUpstream, signing_key: TestKey) -> AsyncIterator[ProxyHarness]:
    harness, runner = await start_proxy(upstream.url, key=signing_key, upstream=upstream)
    yield harness
    await harness.session.close()
    await runner.cleanup()


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """Helpers for test modules (conftest names cannot be imported reliably)."""
    return SimpleNamespace(
        issuer=ISSUER,
        audience=AUDIENCE,
        issuer_name=ISSUER_NAME,
        default_grants=DEFAULT_GRANTS,
        grant=grant,
        build_policy=build_policy,
        issuer_config=issuer_config,
        start_upstream=start_upstream,
        start_proxy=start_proxy,
        RateLimit=RateLimit,
    )
