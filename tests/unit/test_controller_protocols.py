"""Which protocol a backend speaks: every row of the resolution table, the CEL rule that
keeps WebSocket off HTTP/2, the condition and status field it becomes, and what the proxy
is rendered with (HTTP/1.1 byte-identical to the rendering before HTTP/2 existed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nhigate.api import conditions as c
from nhigate.api.models import BackendProtocol, ProtectedService, RouteRule
from nhigate.controller import manifests as m
from nhigate.controller.protocols import (
    APP_PROTOCOLS,
    app_protocol_means,
    resolve_backend_protocol,
)
from nhigate.controller.status import ReplicaReport, owned_problems, service_status
from nhigate.controller.status_writer import service_transitions, status_json

HTTP1, HTTP2 = BackendProtocol.HTTP1, BackendProtocol.HTTP2
FIXTURE = Path(__file__).parent / "fixtures" / "http1_rendering.json"
UID = "0b7c6f1e-2f4a-4d7e-9a51-3c1d2e4f5a6b"


def make_ps(protocol: str | None = None, websocket: bool = False, **spec: Any) -> ProtectedService:
    backend: dict[str, Any] = {"service": "orders", "port": 50051}
    if protocol is not None:
        backend["protocol"] = protocol
    body: dict[str, Any] = {"backend": backend, "issuers": ["ci"], **spec}
    if websocket:
        body["websocket"] = {"paths": ["/ws"]}
    return ProtectedService.model_validate(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": "orders", "namespace": "shop", "uid": UID},
            "spec": body,
        }
    )


def port(app_protocol: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "grpc", "port": 50051, "targetPort": 9000}
    if app_protocol is not None:
        entry["appProtocol"] = app_protocol
    return entry


NOT_FOUND = None
H2C, WS = port("kubernetes.io/h2c"), port("kubernetes.io/ws")
T, F, MISMATCH = c.TRUE, c.FALSE, "AppProtocolMismatch"
# (id, declared protocol, websocket, the port as read, -> protocol, status, reason)
TABLE: list[tuple[str, str | None, bool, dict[str, Any] | None, Any, str, str]] = [
    # an explicit field decides ...
    ("declared h2, no appProtocol", "HTTP/2", False, port(None), HTTP2, T, "Declared"),
    ("declared h1, no appProtocol", "HTTP/1.1", False, port(None), HTTP1, T, "Declared"),
    ("declared h2, h2c agrees", "HTTP/2", False, H2C, HTTP2, T, "Declared"),
    ("declared h2, grpc agrees", "HTTP/2", False, port("grpc"), HTTP2, T, "Declared"),
    ("declared h1, http agrees", "HTTP/1.1", False, port("http"), HTTP1, T, "Declared"),
    ("declared h2, unknown appProtocol", "HTTP/2", False, port("tcp"), HTTP2, T, "Declared"),
    ("declared h2, backend missing", "HTTP/2", False, NOT_FOUND, HTTP2, T, "Declared"),
    # ... unless the port says otherwise: fail closed
    ("declared h1, h2c disagrees", "HTTP/1.1", False, H2C, None, F, MISMATCH),
    ("declared h1, grpc disagrees", "HTTP/1.1", False, port("grpc"), None, F, MISMATCH),
    ("declared h2, http disagrees", "HTTP/2", False, port("http"), None, F, MISMATCH),
    ("declared h2, ws disagrees", "HTTP/2", False, WS, None, F, MISMATCH),
    # websocket implies HTTP/1.1, and is a declaration like the field
    ("websocket, no appProtocol", None, True, port(None), HTTP1, T, "Declared"),
    ("websocket, ws agrees", None, True, WS, HTTP1, T, "Declared"),
    ("websocket, h2c disagrees", None, True, H2C, None, F, MISMATCH),
    ("websocket + declared h1, h2c", "HTTP/1.1", True, H2C, None, F, MISMATCH),
    ("websocket, backend missing", None, True, NOT_FOUND, HTTP1, T, "Declared"),
    # nothing declared: the port's appProtocol
    ("kubernetes.io/h2c", None, False, H2C, HTTP2, T, "AppProtocol"),
    ("grpc", None, False, port("grpc"), HTTP2, T, "AppProtocol"),
    ("http2", None, False, port("http2"), HTTP2, T, "AppProtocol"),
    ("h2c", None, False, port("h2c"), HTTP2, T, "AppProtocol"),
    ("GRPC in capitals", None, False, port("GRPC"), HTTP2, T, "AppProtocol"),
    ("http", None, False, port("http"), HTTP1, T, "AppProtocol"),
    ("kubernetes.io/http", None, False, port("kubernetes.io/http"), HTTP1, T, "AppProtocol"),
    ("kubernetes.io/ws", None, False, WS, HTTP1, T, "AppProtocol"),
    ("kubernetes.io/wss", None, False, port("kubernetes.io/wss"), HTTP1, T, "AppProtocol"),
    # ... and the default
    ("no appProtocol", None, False, port(None), HTTP1, T, "Default"),
    ("empty appProtocol", None, False, port(""), HTTP1, T, "Default"),
    ("unknown appProtocol", None, False, port("https"), HTTP1, T, "Default"),
    ("backend missing", None, False, NOT_FOUND, HTTP1, c.UNKNOWN, "BackendNotFound"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("declared", "websocket", "backend_port", "protocol", "status", "reason"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_resolution_table(
    declared: str | None,
    websocket: bool,
    backend_port: dict[str, Any] | None,
    protocol: BackendProtocol | None,
    status: str,
    reason: str,
) -> None:
    resolved = resolve_backend_protocol(make_ps(declared, websocket), backend_port)
    assert (resolved.protocol, resolved.status, resolved.reason) == (protocol, status, reason)
    assert "Service orders port 50051" in resolved.message


def test_messages_say_what_decided_and_what_to_do() -> None:
    mismatch = resolve_backend_protocol(make_ps("HTTP/1.1"), port("grpc"))
    assert mismatch.message == (
        "spec.backend.protocol says HTTP/1.1 but Service orders port 50051 has appProtocol grpc "
        "(HTTP/2): make them agree; until then the proxy Deployment and Service are left as "
        "they were"
    )
    websocket = resolve_backend_protocol(make_ps(websocket=True), port("kubernetes.io/h2c"))
    assert websocket.message.startswith("spec.websocket says HTTP/1.1 but ")
    derived = resolve_backend_protocol(make_ps(), port("kubernetes.io/h2c"))
    assert derived.message == "Service orders port 50051 has appProtocol kubernetes.io/h2c: HTTP/2"
    unknown = resolve_backend_protocol(make_ps(), port("mysql"))
    assert "appProtocol mysql" in unknown.message
    assert "set spec.backend.protocol" in unknown.message
    unchecked = resolve_backend_protocol(make_ps("HTTP/2"), None)
    assert "not checked" in unchecked.message


def test_only_known_app_protocols_name_a_version() -> None:
    assert {k for k, v in APP_PROTOCOLS.items() if v == HTTP2} == {
        "kubernetes.io/h2c",
        "grpc",
        "http2",
        "h2c",
    }
    for value in (None, "", "https", "tcp", "grpc-web", "kubernetes.io/h2", "h2"):
        assert app_protocol_means(value) is None, value


# --- the API ---------------------------------------------------------------------------------


def test_protocol_has_no_default_and_is_an_enum() -> None:
    assert make_ps().spec.backend.protocol is None
    assert "protocol" not in make_ps().manifest()["spec"]["backend"]
    assert make_ps("HTTP/2").spec.backend.protocol == HTTP2
    for bad in ("h2c", "HTTP/2.0", "http/2", "HTTP/3", ""):
        with pytest.raises(ValidationError):
            make_ps(bad)


def test_websocket_with_http2_is_refused_with_the_crd_message() -> None:
    with pytest.raises(ValidationError) as err:
        make_ps("HTTP/2", websocket=True)
    assert "RFC 8441 extended CONNECT" in str(err.value)
    assert make_ps("HTTP/1.1", websocket=True).spec.websocket is not None


GRPC_PATHS_ACCEPTED = [
    "/payments.v1.Ledger/GetBalance",
    "/payments.v1.Ledger/*",
    "/Ledger/GetBalance",
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
]
GRPC_PATHS_REFUSED = [
    "/payments.v1.*/GetBalance",  # a wildcard inside a segment
    "/payments.v1.Ledger/Get*",
    "/payments.v1.Ledger.*",
    "payments.v1.Ledger/GetBalance",  # not absolute
]


@pytest.mark.parametrize("path", GRPC_PATHS_ACCEPTED)
def test_grpc_method_paths_are_grant_paths(path: str) -> None:
    rule = RouteRule.model_validate({"methods": ["POST"], "paths": [path]})
    assert rule.paths == [path]


@pytest.mark.parametrize("path", GRPC_PATHS_REFUSED)
def test_grpc_paths_with_partial_wildcards_are_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        RouteRule.model_validate({"methods": ["POST"], "paths": [path]})


# --- status ----------------------------------------------------------------------------------


def _status(ps: ProtectedService, backend_port: dict[str, Any] | None) -> Any:
    protocol = resolve_backend_protocol(ps, backend_port)
    backend = {"spec": {"selector": {"app": "orders"}}} if backend_port is not None else None
    return service_status(
        ps,
        deployment={"spec": {"replicas": 1}, "status": {"availableReplicas": 1}},
        replicas=[ReplicaReport("a", "v1", 2e9)],
        version="v1",
        problems=owned_problems(ps, backend, backend_port, [], protocol),
        policy_error=None,
        bypass=[],
        endpoint="http://nhigate-orders.shop.svc:8443",
        protocol=protocol,
    )


def test_a_resolved_protocol_is_a_condition_and_a_status_field() -> None:
    status = _status(make_ps(), port("grpc"))
    assert [d["type"] for d in status.desired] == [
        "Ready",
        "ProxyAvailable",
        "PolicyEnforced",
        "DirectPathBlocked",
        "BackendProtocolResolved",
    ]
    resolved = status.desired[-1]
    assert (resolved["status"], resolved["reason"]) == ("True", "AppProtocol")
    assert status_json(status.fields)["backendProtocol"] == "HTTP/2"
    assert status.desired[0]["status"] == "True"


def test_a_mismatch_keeps_the_service_from_ready_and_claims_no_protocol() -> None:
    status = _status(make_ps("HTTP/1.1"), port("kubernetes.io/h2c"))
    ready, resolved = status.desired[0], status.desired[-1]
    assert (ready["status"], ready["reason"]) == ("False", "AppProtocolMismatch")
    assert (resolved["status"], resolved["reason"]) == ("False", "AppProtocolMismatch")
    assert ready["message"] == resolved["message"]
    assert "backendProtocol" not in status_json(status.fields)


def test_an_unknown_backend_is_not_found_not_mismatched() -> None:
    status = _status(make_ps(), None)
    ready, resolved = status.desired[0], status.desired[-1]
    assert (ready["status"], ready["reason"]) == ("False", "BackendNotFound")
    assert (resolved["status"], resolved["reason"]) == ("Unknown", "BackendNotFound")
    assert status_json(status.fields)["backendProtocol"] == "HTTP/1.1"


def test_a_mismatch_is_a_warning_event_once() -> None:
    mismatch = _status(make_ps("HTTP/1.1"), port("grpc")).desired[-1]
    declared = _status(make_ps("HTTP/1.1"), port(None)).desired[-1]
    key = "BackendProtocolResolved"
    assert service_transitions({}, {key: mismatch}) == [
        ("Warning", "AppProtocolMismatch", mismatch["message"])
    ]
    assert service_transitions({key: declared}, {key: mismatch})[0][1] == "AppProtocolMismatch"
    assert service_transitions({key: mismatch}, {key: mismatch}) == []  # not on every write
    assert service_transitions({key: mismatch}, {key: declared}) == []
    assert service_transitions({}, {key: declared}) == []


# --- rendering -------------------------------------------------------------------------------


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_an_http2_backend_gets_the_flag_and_an_h2c_proxy_port() -> None:
    ps = make_ps("HTTP/2")
    args = m.proxy_args(ps, HTTP2)
    at = args.index("--upstream-protocol")
    assert args[at + 1] == "http2"
    assert args[at - 2 : at] == ["--upstream", "http://orders.shop.svc:50051"]
    deployment = m.build_proxy_deployment(ps, image="img", policy_version="v1", protocol=HTTP2)
    assert _container(deployment)["args"] == args
    ports = {p["name"]: p for p in m.build_proxy_service(ps, HTTP2)["spec"]["ports"]}
    assert ports["proxy"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["admin"]["appProtocol"] == "http"  # probes and metrics stay HTTP/1.1


def test_an_http2_proxy_behind_tls_stays_https() -> None:
    ps = make_ps("HTTP/2", proxy={"tls": {"secretName": "orders-tls"}})
    ports = {p["name"]: p for p in m.build_proxy_service(ps, HTTP2)["spec"]["ports"]}
    assert ports["proxy"]["appProtocol"] == "https"  # ALPN negotiates h2
    assert "--upstream-protocol" in m.proxy_args(ps, HTTP2)


def test_http1_adds_no_flag() -> None:
    assert "--upstream-protocol" not in m.proxy_args(make_ps(), HTTP1)
    assert m.proxy_args(make_ps(), HTTP1) == m.proxy_args(make_ps())


def test_the_native_front_end_serves_what_it_can() -> None:
    """HTTP/1.1 without WebSocket or MCP: native; either of those, or HTTP/2: aiohttp's."""

    def front_end(ps: ProtectedService, protocol: BackendProtocol = HTTP1) -> str:
        args = m.proxy_args(ps, protocol)
        flag = "--http1-server"
        return args[args.index(flag) + 1] if flag in args else "aiohttp"

    assert front_end(make_ps()) == "native"
    assert front_end(make_ps("HTTP/2"), HTTP2) == "aiohttp"
    assert front_end(make_ps(websocket=True)) == "aiohttp"
    assert front_end(make_ps(mcp={"endpoints": ["/mcp"]})) == "aiohttp"


@pytest.mark.parametrize(("protocol", "expected"), [(HTTP1, "http1"), (HTTP2, "http2")])
def test_the_rendered_command_line_parses_as_the_proxys_own(
    protocol: BackendProtocol, expected: str
) -> None:
    """The pod's args run `nhigate proxy` with the resolved protocol (a renamed flag fails here)."""
    from nhigate.cli.main import build_parser
    from nhigate.cli.proxy import settings_from_args

    args = m.proxy_args(make_ps("HTTP/2" if protocol == HTTP2 else None), protocol)
    settings = settings_from_args(build_parser("proxy").parse_args(args))
    assert settings.upstream_protocol == expected


def _fixture() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(FIXTURE.read_text())
    return loaded


@pytest.mark.parametrize("case", sorted(_fixture()))
def test_http1_services_render_byte_identical_to_before(case: str) -> None:
    """tests/unit/fixtures/http1_rendering.json was written by the builders before backend
    protocols existed. Since then an HTTP/1.1 service differs in one way only, on purpose (it
    rolls its proxies once on that upgrade): `--http1-server native` after `--upstream`,
    unless it declares WebSocket paths or MCP endpoints."""
    stored = _fixture()[case]
    ps = ProtectedService.model_validate(stored["protectedService"])
    resolved = resolve_backend_protocol(ps, port(None))
    assert resolved.protocol == HTTP1
    deployment = m.build_proxy_deployment(
        ps,
        image="nhigate:dev",
        policy_version="sha256:0123456789abcdef",
        protocol=resolved.protocol,
    )
    args = _container(deployment)["args"]
    native = ["--http1-server", "native"]
    at = args.index("--upstream") + 2
    if ps.spec.websocket is None and ps.spec.mcp is None:
        assert args[at : at + 2] == native
        del args[at : at + 2]
    else:
        assert "--http1-server" not in args
    service = m.build_proxy_service(ps, resolved.protocol)
    assert json.dumps(deployment, indent=2) == json.dumps(stored["deployment"], indent=2)
    assert json.dumps(service, indent=2) == json.dumps(stored["service"], indent=2)
