"""Every YAML under examples/ applied to a real API server, reconciled, and enforced.

The examples are applied with the built `kubectl apply --server-side`, as a user would apply
them, after one textual change: `namespace: payments` becomes the test's own namespace (so
runs are isolated; the Namespace document is left out, the test's namespace stands for it).
The controller reconciles them; then one `nhigate proxy --kube` process serves the compiled
policy in front of an upstream on 127.0.0.1 and is called with tokens signed by the demo key
(examples/demo-keys/, DEMO ONLY), exactly as the demo does.

test_readme_walkthrough_works_verbatim runs the shell blocks of README.md's walkthrough as
they are written, in namespace `payments`, so README and examples/ cannot drift apart.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from cluster import KUBECTL_TIMEOUT_S, REPO_ROOT, ControlPlane
from controller_harness import (
    JSON,
    ControllerProcess,
    ProxyProcess,
    condition,
    eventually,
    free_port,
)
from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    IDENTITYISSUERS,
    NETWORKPOLICIES,
    PROTECTEDSERVICES,
    REVOCATIONS,
    ROUTEGRANTS,
    SERVICES,
    KubeClient,
    ResourceRef,
)
from nhigate.policy import unpack_document

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

EXAMPLES_DIR = REPO_ROOT / "examples"
EXAMPLE_NAMESPACE = "payments"
DEMO_KEY = EXAMPLES_DIR / "demo-keys" / "demo-issuer-es256.key.pem"
DEMO_KID = "demo-issuer-2025"
DEMO_ISSUER_URL = "https://issuer.demo.nhigate.example"
DEMO_AUDIENCE = "payments-api"
SERVICE = "payments-api"
POLICY_CONFIGMAP = f"nhigate-{SERVICE}-policy"
CI_SUBJECT = "repo:acme/payments:ref:refs/heads/main"
AGENT_SUBJECT = "agent:invoice-reconciler"
LEAKED_JTI = "3f1c9a52-leaked-demo-token"

# What the examples define, by (kind, name): the test below checks each one's outcome, and
# test_every_example_is_applied fails when a file or document is added without a check here.
EXPECTED = {
    ("Namespace", EXAMPLE_NAMESPACE),
    ("Deployment", SERVICE),
    ("Service", SERVICE),
    ("IdentityIssuer", "demo-issuer"),
    ("ProtectedService", SERVICE),
    ("RouteGrant", "ci-deploy"),
    ("RouteGrant", "invoice-agent"),
    ("Revocation", "leaked-agent-token"),
}
_NAMESPACE_LINE = re.compile(rf"^(\s*namespace:\s*){EXAMPLE_NAMESPACE}\s*$", re.MULTILINE)


TESTED_ELSEWHERE = {
    EXAMPLES_DIR / "grpc": REPO_ROOT / "tests" / "integration" / "test_backend_protocol_crds.py",
}
"""Example subdirectories applied after examples/ (not with it), each by a test of its own."""


def example_files() -> list[Path]:
    """Every YAML file under examples/ (recursively, but not `TESTED_ELSEWHERE`), sorted."""
    return sorted(
        p
        for p in EXAMPLES_DIR.rglob("*")
        if p.is_file()
        and p.suffix in (".yaml", ".yml")
        and not any(d in p.parents for d in TESTED_ELSEWHERE)
    )


def in_namespace(text: str, namespace: str) -> str:
    """The example text with every `namespace: payments` line moved to `namespace`."""
    return _NAMESPACE_LINE.sub(lambda m: f"{m.group(1)}{namespace}", text)


def documents(text: str) -> list[JSON]:
    """The non-empty YAML documents of `text`."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def namespace_fields(node: Any) -> list[str]:
    """The value of every `namespace` field anywhere in `node`."""
    if isinstance(node, dict):
        own = [str(v) for k, v in node.items() if k == "namespace" and not isinstance(v, dict)]
        return own + [x for v in node.values() for x in namespace_fields(v)]
    if isinstance(node, list):
        return [x for v in node for x in namespace_fields(v)]
    return []


def demo_token(subject: str, claims: dict[str, str], *, jti: str | None = None) -> str:
    """A token from the demo issuer of examples/issuer.yaml (its private key is public)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": DEMO_ISSUER_URL,
        "aud": DEMO_AUDIENCE,
        "sub": subject,
        "iat": now,
        "exp": now + 600,
        "jti": jti or str(uuid.uuid4()),
        **claims,
    }
    return jwt.encode(payload, DEMO_KEY.read_bytes(), algorithm="ES256", headers={"kid": DEMO_KID})


def test_every_example_is_applied() -> None:
    """The glob of examples/ is exactly what the e2e test applies and checks: nothing forgotten."""
    files = example_files()
    assert {p.name for p in files} == {
        "00-namespace.yaml",
        "backend.yaml",
        "grant-agent.yaml",
        "grant-ci-deploy.yaml",
        "issuer.yaml",
        "protected-service.yaml",
        "revocation.yaml",
    }, "a new example needs its own assertions in test_examples_reconcile_and_enforce"
    for directory, test in TESTED_ELSEWHERE.items():
        assert any(directory.glob("*.yaml")), directory
        assert f"examples/{directory.name}" in test.read_text(), f"{test} does not apply it"
    found = {(d["kind"], d["metadata"]["name"]) for p in files for d in documents(p.read_text())}
    assert found == EXPECTED
    # `kubectl apply -f examples/` takes the files in name order: the namespace must come first.
    assert documents(files[0].read_text())[0]["kind"] == "Namespace"
    for path in files:
        for doc in documents(in_namespace(path.read_text(), "t-rewritten")):
            if doc["kind"] == "Namespace":
                assert doc["metadata"]["name"] == EXAMPLE_NAMESPACE
                continue
            assert doc["metadata"]["namespace"] == "t-rewritten", f"{path} kept its namespace"
            assert set(namespace_fields(doc)) == {"t-rewritten"}, f"{path}: a namespace was kept"


def apply_examples(cp: ControlPlane, namespace: str) -> set[tuple[str, str]]:
    """`kubectl apply --server-side` every example but the Namespace into `namespace`;
    returns the (kind, name) of everything the API server accepted."""
    docs = [
        doc
        for path in example_files()
        for doc in documents(in_namespace(path.read_text(), namespace))
        if doc["kind"] != "Namespace"
    ]
    out = cp.kubectl(
        "apply", "--server-side", "--field-manager=nhigate-examples", "-o", "name", "-f", "-",
        input="\n---\n".join(json.dumps(doc) for doc in docs),
    ).stdout  # fmt: skip
    kinds = {
        "deployment": "Deployment",
        "identityissuer": "IdentityIssuer",
        "protectedservice": "ProtectedService",
        "routegrant": "RouteGrant",
        "revocation": "Revocation",
        "service": "Service",
    }
    applied = set()
    for line in out.split():
        resource, _, name = line.partition("/")
        applied.add((kinds.get(resource.split(".", 1)[0], resource), name))
    return applied


async def test_examples_reconcile_and_enforce(
    control_plane: ControlPlane,
    controller: ControllerProcess,
    kube: KubeClient,
    namespace: str,
    upstream: int,
    tmp_path: Path,
) -> None:
    ns = namespace
    started = time.monotonic()
    applied = apply_examples(control_plane, ns)
    assert applied == EXPECTED - {("Namespace", EXAMPLE_NAMESPACE)}

    async def with_condition(ref: ResourceRef, name: str, type_: str, status: str) -> JSON | None:
        obj = await kube.get(ref, name, ns)
        return obj if condition(obj, type_).get("status") == status else None

    issuer = await eventually(
        lambda: with_condition(IDENTITYISSUERS, "demo-issuer", "Ready", "True"),
        what="IdentityIssuer demo-issuer Ready",
        controller=controller,
    )
    assert issuer["status"]["keyCount"] == 1
    for grant in ("ci-deploy", "invoice-agent"):
        obj = await eventually(
            lambda g=grant: with_condition(ROUTEGRANTS, g, "Accepted", "True"),  # type: ignore[misc]
            what=f"RouteGrant {grant} Accepted",
            controller=controller,
        )
        active = condition(obj, "Active")
        assert active.get("status") == "True", f"{grant}: {active}"
        assert condition(obj, "Accepted")["reason"] == "Accepted"
    revocation = await eventually(
        lambda: with_condition(REVOCATIONS, "leaked-agent-token", "Accepted", "True"),
        what="Revocation leaked-agent-token Accepted",
        controller=controller,
    )
    assert revocation["status"]["observedGeneration"] == revocation["metadata"]["generation"]

    # The ProtectedService's owned objects, each controlled by it.
    ps = await kube.get(PROTECTEDSERVICES, SERVICE, ns)
    assert ps is not None
    owned = {
        "Deployment": (DEPLOYMENTS, f"nhigate-{SERVICE}"),
        "Service": (SERVICES, f"nhigate-{SERVICE}"),
        "NetworkPolicy": (NETWORKPOLICIES, f"nhigate-{SERVICE}-isolation"),
        "ConfigMap": (CONFIGMAPS, POLICY_CONFIGMAP),
    }
    for kind, (ref, name) in owned.items():
        obj = await eventually(
            lambda r=ref, n=name: kube.get(r, n, ns),  # type: ignore[misc]
            what=f"{kind} {name}",
            controller=controller,
        )
        owners = obj["metadata"].get("ownerReferences") or []
        assert [(o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [
            ("ProtectedService", SERVICE, ps["metadata"]["uid"], True)
        ], f"{kind} {name} owners: {owners}"
    deployment = await kube.get(DEPLOYMENTS, f"nhigate-{SERVICE}", ns)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    netpol = await kube.get(NETWORKPOLICIES, f"nhigate-{SERVICE}-isolation", ns)
    assert netpol is not None
    assert netpol["spec"]["podSelector"] == {"matchLabels": {"app": "payments-api"}}

    # The compiled policy carries both grants and the revocation.
    configmap = await kube.get(CONFIGMAPS, POLICY_CONFIGMAP, ns)
    assert configmap is not None
    document = unpack_document(base64.b64decode(configmap["binaryData"]["policy.json.gz"]))
    assert {g.name for g in document.grants} == {f"{ns}/ci-deploy", f"{ns}/invoice-agent"}
    assert [(r.name, r.token_id) for r in document.revocations] == [
        (f"{ns}/leaked-agent-token", LEAKED_JTI)
    ]
    assert [i.issuer for i in document.issuers] == [DEMO_ISSUER_URL]
    assert document.service.name == SERVICE
    reconciled = time.monotonic() - started

    proxy = ProxyProcess(
        control_plane,
        ns,
        POLICY_CONFIGMAP,
        upstream=f"http://127.0.0.1:{upstream}",
        port=free_port(),
        admin_port=free_port(),
        work_dir=tmp_path,
    )
    proxy.start()
    try:
        await _enforce(proxy, ns, document.version)
    finally:
        proxy.stop()
    print(
        f"\nexamples: applied + reconciled in {reconciled:.1f} s, "
        f"whole test {time.monotonic() - started:.1f} s"
    )


async def _enforce(proxy: ProxyProcess, ns: str, version: str) -> None:
    base = f"http://127.0.0.1:{proxy.port}"
    ci = demo_token(CI_SUBJECT, {"job": "deploy"})
    leaked = demo_token(AGENT_SUBJECT, {"team": "finance-ops"}, jti=LEAKED_JTI)
    agent = demo_token(AGENT_SUBJECT, {"team": "finance-ops"})
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        async def call(method: str, path: str, token: str) -> tuple[int, str]:
            """(status, request id): a denial's JSON body and the upstream's echo both carry it."""
            headers = {"Authorization": f"Bearer {token}"}
            async with http.request(method, base + path, headers=headers) as resp:
                body = json.loads(await resp.read())
                return resp.status, str(body["request_id"])

        try:
            await eventually(ready, within=60, what="proxy ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{proxy.log_tail()}") from None

        outcomes = {
            "ci GET": (await call("GET", "/v1/payments/1", ci), 200, "allowed"),
            "ci DELETE": (await call("DELETE", "/v1/payments/1", ci), 403, "no_matching_grant"),
            "leaked GET": (await call("GET", "/v1/payments/1", leaked), 403, "revoked"),
            "agent GET": (await call("GET", "/v1/payments/1", agent), 200, "allowed"),
            "agent invoices": (await call("GET", "/v1/invoices/7/lines", agent), 200, "allowed"),
            "agent POST": (await call("POST", "/v1/refunds", agent), 403, "no_matching_grant"),
        }

        async def audited() -> dict[str, JSON] | None:
            by_id = {r["request_id"]: r for r in proxy.audit_records()}
            wanted = {rid for (_, rid), _, _ in outcomes.values()}
            return by_id if wanted <= by_id.keys() else None

        records = await eventually(audited, within=5, what="audit records of every request")
    for what, ((status, request_id), want_status, want_reason) in outcomes.items():
        record = records[request_id]
        assert (status, record["reason"]) == (want_status, want_reason), f"{what}: {record}"
        assert record["policy_version"] == version, what
    assert records[outcomes["leaked GET"][0][1]]["identity"]["subject"] == AGENT_SUBJECT
    assert records[outcomes["ci GET"][0][1]]["grant"] == f"{ns}/ci-deploy"
    assert records[outcomes["agent GET"][0][1]]["grant"] == f"{ns}/invoice-agent"


README = REPO_ROOT / "README.md"
WALKTHROUGH = "## Five minutes with nhigate"
WALKTHROUGH_TIMEOUT_S = 60.0


def walkthrough_commands(readme: str) -> list[str]:
    """The commands of the ```sh blocks under the walkthrough heading, as written: one entry per
    command (a line ending in `\\` continues it), comment-only lines dropped."""
    _, found, rest = readme.partition(f"\n{WALKTHROUGH}\n")
    assert found, f"README.md has no {WALKTHROUGH!r} section"
    section = rest.split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```$", section, re.DOTALL | re.MULTILINE):
        pending = ""
        for line in block.splitlines():
            pending += line
            if line.endswith("\\"):
                pending += "\n"
                continue
            if pending.strip() and not pending.lstrip().startswith("#"):
                commands.append(pending)
            pending = ""
    return commands


def readme_comment(command: str) -> str:
    """What the README says after `#` on a command's line (its expected outcome)."""
    return command.partition("#")[2].strip()


def run_readme(cp: ControlPlane, command: str) -> subprocess.CompletedProcess[str]:
    """One README command, verbatim, in bash from the repository root, as the cluster's admin."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=REPO_ROOT,
        env=cp.env(),
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT_S,
        check=False,
    )


def get_status(url: str, token: str | None = None) -> int:
    """The HTTP status of a GET (0 when nothing answers)."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        with err:
            return err.code
    except OSError:
        return 0


def poll(probe: Any, what: str, within: float = WALKTHROUGH_TIMEOUT_S) -> Any:
    """Call `probe` until it returns something truthy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")


WALKTHROUGH_CHECKS = (
    r"^kubectl apply -f examples/",
    r"^kubectl get routegrants -n payments",
    r"^kubectl describe protectedservice payments-api -n payments",
    r"^kubectl delete routegrant ci-deploy -n payments",
    r"nhigate explain --resources examples/",
    r"nhigate who-can --resources examples/",
    r"nhigate proxy --resources examples/",
)


def walkthrough_by_check() -> dict[str, str]:
    """README's walkthrough commands by the WALKTHROUGH_CHECKS pattern each one matches, in order;
    fails when the README has a command without a check here, or lacks one."""
    commands = walkthrough_commands(README.read_text())
    matched = [next((k for k in WALKTHROUGH_CHECKS if re.search(k, c)), c) for c in commands]
    assert matched == list(WALKTHROUGH_CHECKS), (
        f"the README walkthrough changed; each command needs its check here: {commands}"
    )
    return dict(zip(WALKTHROUGH_CHECKS, commands, strict=True))


def test_walkthrough_is_what_the_test_runs() -> None:
    """Each README walkthrough command has its check below; a new one needs its own."""
    assert len(walkthrough_by_check()) == len(WALKTHROUGH_CHECKS)


@pytest.mark.timeout(420)
def test_readme_walkthrough_works_verbatim(
    control_plane: ControlPlane, crds_installed: list[str], tmp_path: Path
) -> None:
    """README.md's walkthrough, command by command and exactly as written, on a fresh cluster
    with nhigate's CRDs and its controller (the README's premise); then its promises hold."""
    commands = walkthrough_by_check()
    cp = control_plane
    assert cp.kubectl("get", "namespace", EXAMPLE_NAMESPACE, check=False).returncode != 0, (
        "namespace payments exists before the walkthrough: it would not start from a fresh cluster"
    )
    controller = ControllerProcess(cp, EXAMPLE_NAMESPACE, tmp_path / "controller.log")
    controller.start()
    proxy: ProxyProcess | None = None
    try:
        applied = run_readme(cp, commands[WALKTHROUGH_CHECKS[0]])
        assert applied.returncode == 0, f"kubectl apply -f examples/ failed:\n{applied.stderr}"
        created = set(applied.stdout.split("\n"))
        assert {
            "namespace/payments created",
            "deployment.apps/payments-api created",
            "service/payments-api created",
            "protectedservice.nhigate.io/payments-api created",
            "routegrant.nhigate.io/ci-deploy created",
        } <= created, applied.stdout

        # The columns the README names, and both grants Accepted by the controller.
        get = commands[WALKTHROUGH_CHECKS[1]]

        def grants_accepted() -> list[list[str]] | None:
            out = run_readme(cp, get)
            rows = [line.split() for line in out.stdout.splitlines()]
            ok = out.returncode == 0 and len(rows) == 3 and all(r[2] == "True" for r in rows[1:])
            return rows if ok else None

        rows = poll(grants_accepted, f"`{get}` to show both grants Accepted")
        assert rows[0] == ["NAME", *readme_comment(get).split()]
        assert sorted(r[0] for r in rows[1:]) == ["ci-deploy", "invoice-agent"]
        assert {r[1] for r in rows[1:]} == {SERVICE}

        describe = commands[WALKTHROUGH_CHECKS[2]]
        described = poll(
            lambda: (
                (out := run_readme(cp, describe)).returncode == 0
                and "PolicyEnforced" in out.stdout
                and out
            ),
            f"`{describe}` to show the PolicyEnforced condition",
        )
        for word in ("Ready", "PolicyEnforced", "DirectPathBlocked"):
            assert word in readme_comment(describe)
            assert re.search(rf"Type:\s+{word}\b", described.stdout), described.stdout

        # "the next request is denied": a proxy replica serving this namespace's policy.
        proxy = ProxyProcess(
            cp,
            EXAMPLE_NAMESPACE,
            POLICY_CONFIGMAP,
            upstream=f"http://127.0.0.1:{free_port()}",
            port=free_port(),
            admin_port=free_port(),
            work_dir=tmp_path,
        )
        proxy.start()
        poll(lambda: get_status(f"http://127.0.0.1:{proxy.admin_port}/readyz") == 200, "proxy")
        url = f"http://127.0.0.1:{proxy.port}/v1/payments/42"
        ci = demo_token(CI_SUBJECT, {"job": "deploy"})
        # Allowed: the upstream port has no listener, so the proxy answers 502, never 403.
        assert get_status(url, ci) == 502
        deleted = run_readme(cp, commands[WALKTHROUGH_CHECKS[3]])
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.startswith('routegrant.nhigate.io "ci-deploy" deleted'), deleted
        poll(lambda: get_status(url, ci) == 403, "the next request to be denied", within=10)
    finally:
        if proxy is not None:
            proxy.stop()
        controller.stop()
        cp.kubectl("delete", "namespace", EXAMPLE_NAMESPACE, "--wait=false", "--ignore-not-found")

    # Without a cluster: explain says DENIED (exit 1), who-can names the CI job's grant.
    explained = run_readme(cp, commands[WALKTHROUGH_CHECKS[4]])
    assert explained.returncode == 1, explained.stderr
    assert "DENIED: no_matching_grant" in explained.stdout
    who = run_readme(cp, commands[WALKTHROUGH_CHECKS[5]])
    assert who.returncode == 0, who.stderr
    assert "(grant payments/ci-deploy)" in who.stdout
    _standalone_proxy_serves(commands[WALKTHROUGH_CHECKS[6]], tmp_path)


def _standalone_proxy_serves(command: str, tmp_path: Path) -> None:
    """The README's cluster-free proxy: ready on its admin port, refusing an anonymous caller."""
    listen = re.search(r"--listen (\S+)", command)
    admin = re.search(r"--admin-listen (\S+)", command)
    assert listen, command
    assert admin, command
    with (tmp_path / "standalone-proxy.log").open("wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        poll(
            lambda: get_status(f"http://{admin.group(1)}/readyz") == 200 or proc.poll() is not None,
            "the standalone proxy to be ready",
            within=30,
        )
        assert proc.poll() is None, (tmp_path / "standalone-proxy.log").read_text()
        assert get_status(f"http://{listen.group(1)}/v1/payments/42") == 401
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
