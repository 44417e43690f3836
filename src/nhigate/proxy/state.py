"""What the data plane shares across requests (`ProxyState`, one per process) and the
interfaces of the authenticator and signer it holds."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiohttp import web

from nhigate.policy import Identity, IssuerConfig, Reason
from nhigate.policy.document import UpstreamCredential
from nhigate.proxy.audit import AuditLog
from nhigate.proxy.connections import ConnectionAudit, ConnectionLimits
from nhigate.proxy.forward import UpstreamPool
from nhigate.proxy.headers import safe_header_value
from nhigate.proxy.mcp import SessionBindings
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import PolicyHolder
from nhigate.proxy.ratelimit import RateLimiter
from nhigate.proxy.settings import ProxySettings
from nhigate.proxy.usage import UsageRecorder
from nhigate.proxy.websocket import Tunnels

Clock = Callable[[], float]


class AuthnResult(Protocol):
    """What `Authenticator.authenticate` returns on failure."""

    @property
    def reason(self) -> Reason: ...

    @property
    def detail(self) -> str: ...


class Authenticating(Protocol):
    """The authenticator interface the pipeline uses (`nhigate.proxy.authn.Authenticator`)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def update_issuers(self, issuers: Sequence[IssuerConfig]) -> None: ...

    async def authenticate(
        self, authorization: str | None, spiffe_id: str | None = None
    ) -> Identity | AuthnResult: ...

    def authenticate_now(
        self, authorization: str | None, spiffe_id: str | None = None
    ) -> Identity | AuthnResult | None:
        """The answer when no signature must be checked (e.g. a cached token), else None."""


class AssertionSigning(Protocol):
    """The identity-assertion signer interface (`nhigate.proxy.assertion.AssertionSigner`)."""

    def sign(
        self, identity: Identity, grant: str | None, audience: str, ttl: float, now: float
    ) -> str: ...

    def public_jwks(self) -> dict[str, object]: ...


class UpstreamCredentialFile:
    """The injected upstream credential, re-read when its file changes (checked once a second)."""

    def __init__(self, spec: UpstreamCredential, loop_time: Clock) -> None:
        self.spec = spec
        self._loop_time = loop_time
        self._checked = -1.0
        self._stamp: tuple[int, int] | None = None
        self._value: str | None = None

    def header_value(self) -> str:
        """`prefix + file content` (trailing newline stripped); raises OSError if unreadable."""
        now = self._loop_time()
        if now - self._checked >= 1.0 or self._value is None:
            self._checked = now
            st = os.stat(self.spec.value_file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp or self._value is None:
                raw = Path(self.spec.value_file).read_text(encoding="utf-8").strip()
                self._value = safe_header_value(self.spec.prefix + raw)
                self._stamp = stamp
        return self._value


@dataclass
class ProxyState:
    """Everything the data plane shares across requests (one per process)."""

    settings: ProxySettings
    holder: PolicyHolder
    metrics: ProxyMetrics
    audit: AuditLog
    clock: Clock
    limiter: RateLimiter = field(default_factory=RateLimiter)
    authenticator: Authenticating | None = None
    signer: AssertionSigning | None = None
    pool: UpstreamPool | None = None
    draining: bool = False
    inflight: int = 0
    background: list[asyncio.Task[None]] = field(default_factory=list)
    credential: UpstreamCredentialFile | None = None
    mcp_sessions: SessionBindings = field(default_factory=SessionBindings)
    usage: UsageRecorder = field(default_factory=UsageRecorder)
    """Allowed requests per grant and rule, reported on this replica's Lease."""
    tunnels: Tunnels = field(default_factory=Tunnels)
    """Open WebSocket connections, re-checked on every policy swap and timer tick."""
    upstream_ssl: ssl.SSLContext | None = None

    @property
    def ready(self) -> bool:
        """Serving: a valid policy is loaded and shutdown has not begun."""
        return self.holder.current is not None and not self.draining

    def connection_rules(self) -> tuple[ConnectionLimits, ConnectionAudit]:
        """The proxied port's client-connection limits and the audit of what they refuse
        (connections.py), as every HTTP/1.1 front end applies them."""
        settings = self.settings
        limits = ConnectionLimits(
            request_head_timeout=settings.request_head_timeout,
            idle_timeout=settings.idle_timeout,
            max_connections=settings.max_connections,
        )
        audit = ConnectionAudit(
            self.audit, self.metrics, self.holder, self.clock, settings.upstream.url
        )
        return limits, audit


STATE: web.AppKey[ProxyState] = web.AppKey("nhigate_proxy_state", ProxyState)
