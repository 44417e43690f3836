"""`spec.backend.protocol` on a real kube-apiserver, and the controller resolving it.

The CRD takes `HTTP/1.1` or `HTTP/2` and nothing else, keeps no default (so the backend
Service port's `appProtocol` can decide), and refuses WebSocket together with HTTP/2. The
gRPC example (examples/grpc/) applies and is reconciled into an HTTP/2 proxy whose grant
allows exactly the gRPC methods it names. The controller reports `BackendProtocolResolved`
for each way a protocol is decided, and fails closed on a mismatch: the proxy Deployment is
left exactly as it was. There is no kubelet: nothing runs the rendered pods.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import pytest
from pydantic import ValidationError

from cluster import REPO_ROOT, ControlPlane
from controller_harness import (
    JSON,
    ControllerProcess,
    apply_all,
    backend_service,
    condition,
    eventually,
    issuer,
    protected_service,
)
from nhigate.api.models import ProtectedService
from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    PROTECTEDSERVICES,
    ROUTEGRANTS,
    SERVICES,
    KubeClient,
)
from nhigate.policy import (
    Facts,
    Identity,
    IdentityKind,
    Reason,
    compile_policy,
    decide,
    unpack_document,
)

pytestmark = pytest.mark.cluster

GRPC_EXAMPLE = REPO_ROOT / "examples" / "grpc"
ISSUER_EXAMPLE = REPO_ROOT / "examples" / "issuer.yaml"
_EXAMPLE_NAMESPACE = re.compile(r"^(\s*namespace:\s*)payments\s*$", re.MULTILINE)
WEBSOCKET_MESSAGE = (
    "websocket needs backend.protocol HTTP/1.1: WebSocket over HTTP/2 (RFC 8441 extended "
    "CONNECT) is not supported"
)


def ps_manifest(namespace: str, name: str, backend: JSON, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"backend": backend, "issuers": ["ci"], **spec},
        }
    )


def kubectl_apply(cp: ControlPlane, manifest: str) -> tuple[int, str]:
    result = cp.kubectl("apply", "--server-side", "-f", "-", check=False, input=manifest)
    return result.returncode, result.stderr


def test_protocol_is_an_enum_without_default_and_refused_with_websocket(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str
) -> None:
    cp, ns = control_plane, namespace
    assert "protectedservices.nhigate.io" in crds_installed
    accepted = {
        "h2": ({"service": "orders", "port": 50051, "protocol": "HTTP/2"}, {}),
        "h1": ({"service": "orders", "port": 80, "protocol": "HTTP/1.1"}, {}),
        "unset": ({"service": "orders", "port": 80}, {}),
        "ws-h1": (
            {"service": "chat", "port": 80, "protocol": "HTTP/1.1"},
            {"websocket": {"paths": ["/ws"]}},
        ),
        "ws-unset": ({"service": "chat", "port": 80}, {"websocket": {"paths": ["/ws"]}}),
    }
    for name, (backend, spec) in accepted.items():
        code, err = kubectl_apply(cp, ps_manifest(ns, name, backend, **spec))
        assert code == 0, (name, err)
    stored = {
        name: json.loads(
            cp.kubectl("get", "protectedservice", name, "-n", ns, "-o", "json").stdout
        )["spec"]["backend"]
        for name in accepted
    }
    assert stored["h2"]["protocol"] == "HTTP/2"
    assert stored["h1"]["protocol"] == "HTTP/1.1"
    assert "protocol" not in stored["unset"]  # no schema default: appProtocol may decide
    assert "protocol" not in stored["ws-unset"]

    refused = {
        "h2c": ({"service": "orders", "port": 80, "protocol": "h2c"}, {}, "spec.backend.protocol"),
        "lower": ({"service": "o", "port": 80, "protocol": "http/2"}, {}, "spec.backend.protocol"),
        "h3": ({"service": "orders", "port": 80, "protocol": "HTTP/3"}, {}, "Unsupported value"),
        "ws-h2": (
            {"service": "chat", "port": 80, "protocol": "HTTP/2"},
            {"websocket": {"paths": ["/ws"]}},
            WEBSOCKET_MESSAGE,
        ),
    }
    for name, (backend, spec, expected) in refused.items():
        code, err = kubectl_apply(cp, ps_manifest(ns, name, backend, **spec))
        assert code != 0, name
        assert expected in err, (name, err)
        if name == "ws-h2":
            assert "spec.websocket" in err, err  # the CEL rule's fieldPath
            # Python refuses it with the API server's words (standalone mode, explain)
            body = json.loads(ps_manifest(ns, name, backend, **spec))
            with pytest.raises(ValidationError, match=re.escape(WEBSOCKET_MESSAGE)):
                ProtectedService.model_validate(body)
    # an existing WebSocket service cannot be switched to HTTP/2 either
    ws_backend, ws_spec = accepted["ws-unset"]
    switched = ps_manifest(ns, "ws-unset", {**ws_backend, "protocol": "HTTP/2"}, **ws_spec)
    code, err = kubectl_apply(cp, switched)
    assert code != 0
    assert WEBSOCKET_MESSAGE in err, err
    names = cp.kubectl("get", "protectedservices", "-n", ns, "-o", "name").stdout.split()
    assert sorted(names) == sorted(f"protectedservice.nhigate.io/{n}" for n in accepted)


def grant_manifest(namespace: str, name: str, path: str) -> str:
    return json.dumps(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "RouteGrant",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "target": {"protectedService": "ledger"},
                "subjects": [{"token": {"issuer": "ci", "subject": "agent"}}],
                "rules": [{"methods": ["POST"], "paths": [path]}],
            },
        }
    )


def test_grpc_method_paths_in_grants_on_the_api_server(
    control_plane: ControlPlane, crds_installed: list[str], namespace: str
) -> None:
    """`/pkg.Service/Method` and `/pkg.Service/*` are grant paths; partial wildcards are not."""
    accepted = ["/payments.v1.Ledger/GetBalance", "/payments.v1.Ledger/*", "/Ledger/Get"]
    for i, path in enumerate(accepted):
        code, err = kubectl_apply(control_plane, grant_manifest(namespace, f"ok-{i}", path))
        assert code == 0, (path, err)
    for i, path in enumerate(["/payments.v1.*/GetBalance", "/payments.v1.Ledger/Get*"]):
        code, err = kubectl_apply(control_plane, grant_manifest(namespace, f"bad-{i}", path))
        assert code != 0, path
        assert '"*" and "**" must be whole segments' in err, (path, err)


# --- the gRPC example ------------------------------------------------------------------------


def example_documents(namespace: str) -> list[str]:
    """examples/issuer.yaml and examples/grpc/*.yaml, moved from `payments` to `namespace`."""
    paths = [ISSUER_EXAMPLE, *sorted(GRPC_EXAMPLE.glob("*.yaml"))]
    return [
        _EXAMPLE_NAMESPACE.sub(lambda m: f"{m.group(1)}{namespace}", p.read_text()) for p in paths
    ]


async def _get_when(kube: KubeClient, ref: Any, name: str, ns: str, test: Any) -> JSON | None:
    obj = await kube.get(ref, name, ns)
    return obj if obj is not None and test(obj) else None


def _args(deployment: JSON) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def _proxy_port(service: JSON) -> JSON:
    port: JSON = next(p for p in service["spec"]["ports"] if p["name"] == "proxy")
    return port


def _resolved(reason: str, generation: int | None = None) -> Any:
    def test(ps: JSON) -> bool:
        cond = condition(ps, "BackendProtocolResolved")
        at = generation or ps["metadata"]["generation"]
        return cond.get("reason") == reason and cond.get("observedGeneration") == at

    return test


async def test_the_grpc_example_is_reconciled_into_an_http2_proxy(
    control_plane: ControlPlane, controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    assert {p.name for p in GRPC_EXAMPLE.glob("*.yaml")} == {
        "backend.yaml",
        "protected-service.yaml",
        "grant.yaml",
    }, "examples/grpc changed: this test applies and checks each file"
    for text in example_documents(ns):
        code, err = kubectl_apply(control_plane, text)
        assert code == 0, err
    backend = await kube.get(SERVICES, "ledger", ns)
    assert backend is not None
    assert backend["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"

    ps = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "ledger", ns, _resolved("Declared")),
        what="ledger BackendProtocolResolved=True Declared",
        controller=controller,
    )
    resolved = condition(ps, "BackendProtocolResolved")
    assert resolved["status"] == "True"
    assert "appProtocol kubernetes.io/h2c" in resolved["message"]
    assert "agrees" in resolved["message"]
    assert ps["status"]["backendProtocol"] == "HTTP/2"
    wide = control_plane.kubectl("get", "protectedservice", "ledger", "-n", ns, "-o", "wide")
    header, row = wide.stdout.splitlines()[:2]
    assert row.split()[header.split().index("PROTOCOL")] == "HTTP/2"
    plain = control_plane.kubectl("get", "protectedservice", "ledger", "-n", ns).stdout
    assert "PROTOCOL" not in plain  # priority 1: only with -o wide

    deployment = await kube.get(DEPLOYMENTS, "nhigate-ledger", ns)
    assert deployment is not None
    args = _args(deployment)
    assert args[args.index("--upstream-protocol") + 1] == "http2"
    assert args[args.index("--upstream") + 1] == f"http://ledger.{ns}.svc:50051"
    proxy_service = await kube.get(SERVICES, "nhigate-ledger", ns)
    assert proxy_service is not None
    assert _proxy_port(proxy_service)["appProtocol"] == "kubernetes.io/h2c"

    grant = await eventually(
        lambda: _get_when(
            kube, ROUTEGRANTS, "ledger-reader", ns,
            lambda g: condition(g, "Accepted").get("status") == "True",
        ),
        what="ledger-reader Accepted",
        controller=controller,
    )  # fmt: skip
    assert condition(grant, "Accepted")["reason"] == "Accepted"
    configmap = await eventually(
        lambda: kube.get(CONFIGMAPS, "nhigate-ledger-policy", ns), what="ledger policy"
    )
    document = unpack_document(base64.b64decode(configmap["binaryData"]["policy.json.gz"]))
    assert [g.name for g in document.grants] == [f"{ns}/ledger-reader"]
    policy = compile_policy(document)
    agent = Identity(
        kind=IdentityKind.JWT, issuer="demo-issuer", subject="agent:invoice-reconciler"
    )
    other = Identity(kind=IdentityKind.JWT, issuer="demo-issuer", subject="agent:someone-else")
    now = time.time()  # before the grant's expiresAt (2030)

    def allowed(identity: Identity, method: str, path: str) -> bool:
        decision = decide(policy, Facts(identity, method, path, now))
        assert decision.reason in (Reason.ALLOWED, Reason.NO_MATCHING_GRANT), decision
        return decision.allowed

    # exactly one method of payments.v1.Ledger ...
    assert allowed(agent, "POST", "/payments.v1.Ledger/GetBalance")
    for path in (
        "/payments.v1.Ledger/Transfer",
        "/payments.v1.Ledger/GetBalanceX",
        "/payments.v1.Ledger/getbalance",
        "/payments.v1.Ledger/GetBalance/x",
        "/payments.v1.Ledgers/GetBalance",
    ):
        assert not allowed(agent, "POST", path), path
    # ... and the whole health service, one segment deep
    for method_name in ("Check", "Watch"):
        assert allowed(agent, "POST", f"/grpc.health.v1.Health/{method_name}")
    assert not allowed(agent, "POST", "/grpc.health.v1.Health/Check/more")
    assert not allowed(agent, "POST", "/grpc.health.v1.Health")
    assert not allowed(agent, "POST", "/grpc.health.v1.HealthX/Check")
    # gRPC is POST only; nobody else is granted
    assert not allowed(agent, "GET", "/payments.v1.Ledger/GetBalance")
    assert decide(policy, Facts(other, "POST", "/payments.v1.Ledger/GetBalance", now)).reason == (
        Reason.NO_MATCHING_GRANT
    )


# --- each way a protocol is decided ----------------------------------------------------------


async def test_each_reason_of_backend_protocol_resolved(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    h2c = {"ports": [{"port": 80, "targetPort": 9000, "appProtocol": "kubernetes.io/h2c"}]}
    await apply_all(
        kube,
        issuer(ns),
        backend_service(ns, "derived", **h2c),
        backend_service(ns, "plain"),
        backend_service(ns, "chat", **h2c),
        protected_service(ns, "derived", backend={"service": "derived", "port": 80}),
        protected_service(ns, "plain", backend={"service": "plain", "port": 80}),
        # WebSocket needs HTTP/1.1, but the port says h2c: refused from the start
        protected_service(
            ns, "chat", backend={"service": "chat", "port": 80}, websocket={"paths": ["/ws"]}
        ),
        protected_service(ns, "ghost", backend={"service": "ghost", "port": 80}),
    )

    # appProtocol decides when nothing is declared
    derived = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "derived", ns, _resolved("AppProtocol")),
        what="derived AppProtocol",
        controller=controller,
    )
    assert condition(derived, "BackendProtocolResolved")["status"] == "True"
    assert derived["status"]["backendProtocol"] == "HTTP/2"
    deployment = await kube.get(DEPLOYMENTS, "nhigate-derived", ns)
    assert deployment is not None
    assert "--upstream-protocol" in _args(deployment)
    assert _args(deployment)[_args(deployment).index("--upstream-protocol") + 1] == "http2"

    # no appProtocol, nothing declared: HTTP/1.1, rendered as before HTTP/2 existed
    plain = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "plain", ns, _resolved("Default")),
        what="plain Default",
        controller=controller,
    )
    assert plain["status"]["backendProtocol"] == "HTTP/1.1"
    plain_deployment = await kube.get(DEPLOYMENTS, "nhigate-plain", ns)
    assert plain_deployment is not None
    assert "--upstream-protocol" not in _args(plain_deployment)
    plain_service = await kube.get(SERVICES, "nhigate-plain", ns)
    assert plain_service is not None
    assert _proxy_port(plain_service)["appProtocol"] == "http"

    # a mismatch at creation: no proxy is rolled out at all
    chat = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "chat", ns, _resolved("AppProtocolMismatch")),
        what="chat AppProtocolMismatch",
        controller=controller,
    )
    resolved = condition(chat, "BackendProtocolResolved")
    assert resolved["status"] == "False"
    assert resolved["message"].startswith("spec.websocket says HTTP/1.1 but Service chat port 80")
    ready = condition(chat, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AppProtocolMismatch")
    assert "backendProtocol" not in chat["status"]
    assert await kube.get(DEPLOYMENTS, "nhigate-chat", ns) is None
    assert await kube.get(SERVICES, "nhigate-chat", ns) is None
    assert await kube.get(CONFIGMAPS, "nhigate-chat-policy", ns) is not None  # the rest is there

    async def mismatch_events() -> list[JSON]:
        events, _ = await kube.list(EVENTS, ns)
        return [
            e
            for e in events
            if e["reason"] == "AppProtocolMismatch" and e["involvedObject"]["name"] == "chat"
        ]

    (event,) = await eventually(mismatch_events, what="AppProtocolMismatch Warning event")
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "ProtectedService"
    assert event["message"] == resolved["message"]

    # no backend Service: Unknown until it appears; then its appProtocol decides
    ghost = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "ghost", ns, _resolved("BackendNotFound")),
        what="ghost BackendNotFound",
        controller=controller,
    )
    assert condition(ghost, "BackendProtocolResolved")["status"] == "Unknown"
    assert ghost["status"]["backendProtocol"] == "HTTP/1.1"
    await apply_all(kube, backend_service(ns, "ghost", ports=[{"port": 80, "appProtocol": "grpc"}]))
    await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "ghost", ns, _resolved("AppProtocol")),
        what="ghost AppProtocol once its Service exists",
        controller=controller,
    )
    ghost_deployment = await eventually(
        lambda: _get_when(
            kube, DEPLOYMENTS, "nhigate-ghost", ns, lambda d: "--upstream-protocol" in _args(d)
        ),
        what="ghost proxy re-rendered for HTTP/2",
        controller=controller,
    )
    assert _args(ghost_deployment)[_args(ghost_deployment).index("--upstream-protocol") + 1] == (
        "http2"
    )


async def test_a_mismatch_leaves_the_running_proxy_as_it_was_until_fixed(
    controller: ControllerProcess, kube: KubeClient, namespace: str
) -> None:
    ns = namespace
    declared = {"service": "backend", "port": 80, "protocol": "HTTP/1.1"}
    await apply_all(
        kube,
        issuer(ns),
        backend_service(ns),
        protected_service(ns, backend=declared, proxy={"replicas": 2}),
    )
    ps = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "api", ns, _resolved("Declared")),
        what="api Declared",
        controller=controller,
    )
    assert ps["status"]["backendProtocol"] == "HTTP/1.1"
    before = await kube.get(DEPLOYMENTS, "nhigate-api", ns)
    service_before = await kube.get(SERVICES, "nhigate-api", ns)
    assert before is not None
    assert service_before is not None
    assert "--upstream-protocol" not in _args(before)

    # the backend now says h2c: the declaration disagrees
    h2c = [{"name": "grpc", "port": 80, "targetPort": 8080, "appProtocol": "kubernetes.io/h2c"}]
    await apply_all(kube, backend_service(ns, ports=h2c))
    ps = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "api", ns, _resolved("AppProtocolMismatch")),
        what="api AppProtocolMismatch after the Service changed",
        controller=controller,
    )
    assert condition(ps, "Ready")["reason"] == "AppProtocolMismatch"
    assert "backendProtocol" not in ps["status"]

    # a spec change that would change the Deployment is not rolled out while they disagree
    await apply_all(kube, protected_service(ns, backend=declared, proxy={"replicas": 3}))
    generation = int(before["metadata"]["generation"])
    ps = await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "api", ns, _resolved("AppProtocolMismatch")),
        what="the new generation judged",
        controller=controller,
    )
    assert ps["metadata"]["generation"] == 2
    after = await kube.get(DEPLOYMENTS, "nhigate-api", ns)
    service_after = await kube.get(SERVICES, "nhigate-api", ns)
    assert after is not None
    assert service_after is not None
    assert after["spec"] == before["spec"]
    assert int(after["metadata"]["generation"]) == generation
    assert service_after["spec"]["ports"] == service_before["spec"]["ports"]

    # fixed by declaring what the port says: rolled out, with the spec change
    await apply_all(
        kube,
        protected_service(ns, backend={**declared, "protocol": "HTTP/2"}, proxy={"replicas": 3}),
    )
    await eventually(
        lambda: _get_when(kube, PROTECTEDSERVICES, "api", ns, _resolved("Declared")),
        what="api Declared HTTP/2",
        controller=controller,
    )
    fixed = await kube.get(DEPLOYMENTS, "nhigate-api", ns)
    assert fixed is not None
    assert fixed["spec"]["replicas"] == 3
    assert _args(fixed)[_args(fixed).index("--upstream-protocol") + 1] == "http2"
    service_fixed = await kube.get(SERVICES, "nhigate-api", ns)
    assert service_fixed is not None
    assert _proxy_port(service_fixed)["appProtocol"] == "kubernetes.io/h2c"
    ps = await kube.get(PROTECTEDSERVICES, "api", ns)
    assert ps is not None
    assert ps["status"]["backendProtocol"] == "HTTP/2"
    assert condition(ps, "Ready")["reason"] != "AppProtocolMismatch"
