"""Which protocol a ProtectedService's backend speaks (`resolve_backend_protocol`: pure).

What decides, first match wins:

1. `spec.backend.protocol`, when set;
2. `spec.websocket`, which implies HTTP/1.1 (WebSocket over HTTP/2, RFC 8441, is not
   supported; the CRD refuses it together with `protocol: HTTP/2`);
3. the backend Service port's `appProtocol` (`kubernetes.io/h2c`, `grpc`, `http2`, `h2c`:
   HTTP/2; `http`, `kubernetes.io/http`, `kubernetes.io/ws`, `kubernetes.io/wss`: HTTP/1.1);
4. HTTP/1.1.

A declaration (1 or 2) that disagrees with the port's `appProtocol` resolves to nothing:
a proxy speaking the wrong protocol would fail every request, so the controller keeps the
proxy Deployment and Service as they were and reports `AppProtocolMismatch` (fail closed).
An `appProtocol` that names no HTTP version (`https`, `tcp`, ...) neither decides nor
disagrees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from nhigate.api import conditions as c
from nhigate.api.models import BackendProtocol, ProtectedService

HTTP1: Final = BackendProtocol.HTTP1
HTTP2: Final = BackendProtocol.HTTP2

APP_PROTOCOLS: Final[Mapping[str, BackendProtocol]] = {
    "kubernetes.io/h2c": HTTP2,
    "grpc": HTTP2,
    "http2": HTTP2,
    "h2c": HTTP2,
    "http": HTTP1,
    "kubernetes.io/http": HTTP1,
    "kubernetes.io/ws": HTTP1,
    "kubernetes.io/wss": HTTP1,
}
"""`appProtocol` values (compared in lower case) and the HTTP version each one means."""


@dataclass(frozen=True, slots=True)
class ProtocolResolution:
    """The protocol resolved for a backend, and the `BackendProtocolResolved` condition."""

    protocol: BackendProtocol | None
    """What the proxy is rendered with; None when the spec and the Service disagree (then
    nothing protocol-dependent may be rolled out)."""
    status: str
    reason: str
    message: str


def app_protocol_means(app_protocol: str | None) -> BackendProtocol | None:
    """The HTTP version an `appProtocol` value names (None: absent, or not one we know)."""
    if app_protocol is None:
        return None
    return APP_PROTOCOLS.get(app_protocol.lower())


def resolve_backend_protocol(
    ps: ProtectedService, backend_port: Mapping[str, Any] | None
) -> ProtocolResolution:
    """The protocol of `ps`'s backend, given its Service port entry as read (`backend_port`,
    None: the Service or the port does not exist)."""
    backend = ps.spec.backend
    where = f"Service {backend.service} port {backend.port}"
    declared, source = _declared(ps)
    if backend_port is None:
        if declared is not None:
            message = (
                f"{source}: {declared} ({where} was not found, so its appProtocol is not checked)"
            )
            return ProtocolResolution(declared, c.TRUE, c.REASON_DECLARED, message)
        message = f"{where} was not found: the proxy speaks HTTP/1.1 until its appProtocol is read"
        return ProtocolResolution(HTTP1, c.UNKNOWN, c.REASON_BACKEND_NOT_FOUND, message)
    raw = backend_port.get("appProtocol")
    app_protocol = str(raw) if raw else None
    meant = app_protocol_means(app_protocol)
    if declared is not None:
        if meant is not None and meant != declared:
            message = (
                f"{source} says {declared} but {where} has appProtocol {app_protocol} "
                f"({meant}): make them agree; until then the proxy Deployment and Service "
                "are left as they were"
            )
            return ProtocolResolution(None, c.FALSE, c.REASON_APP_PROTOCOL_MISMATCH, message)
        message = f"{source}: {declared}" + _agreement(where, app_protocol, meant)
        return ProtocolResolution(declared, c.TRUE, c.REASON_DECLARED, message)
    if meant is not None:
        message = f"{where} has appProtocol {app_protocol}: {meant}"
        return ProtocolResolution(meant, c.TRUE, c.REASON_APP_PROTOCOL, message)
    if app_protocol is None:
        message = f"nothing declares a protocol and {where} has no appProtocol: HTTP/1.1"
    else:
        message = (
            f"appProtocol {app_protocol} of {where} names no HTTP version nhigate knows: "
            "HTTP/1.1 (set spec.backend.protocol to say otherwise)"
        )
    return ProtocolResolution(HTTP1, c.TRUE, c.REASON_DEFAULT, message)


def _declared(ps: ProtectedService) -> tuple[BackendProtocol | None, str]:
    """What the spec itself says, and which field says it."""
    if ps.spec.backend.protocol is not None:
        return ps.spec.backend.protocol, "spec.backend.protocol"
    if ps.spec.websocket is not None:
        return HTTP1, "spec.websocket"  # WebSocket needs HTTP/1.1
    return None, ""


def _agreement(where: str, app_protocol: str | None, meant: BackendProtocol | None) -> str:
    if app_protocol is None:
        return f" ({where} has no appProtocol)"
    if meant is None:
        return f" ({where} has appProtocol {app_protocol}, which names no HTTP version)"
    return f" (appProtocol {app_protocol} of {where} agrees)"
