"""`nhigate access-review --cluster` on the real API server: it reads the resources from the
cluster, and every grant it proposes is accepted by kube-apiserver (the CRD's OpenAPI schema
and CEL rules) with `kubectl apply --dry-run=server`, client-side and server-side apply."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from cluster import ControlPlane
from nhigate.cli.main import main
from nhigate.policy import Identity, IdentityKind
from nhigate.proxy.audit import audit_line

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AT = "2026-06-01T00:00:00Z"
START = datetime(2026, 5, 1, tzinfo=UTC).timestamp()
CI = Identity(
    kind=IdentityKind.JWT, issuer="demo-issuer", subject="repo:acme/payments:ref:refs/heads/main"
)
BATCH = Identity(kind=IdentityKind.JWT, issuer="demo-issuer", subject="batch")

WIDE_GRANT = """
apiVersion: nhigate.io/v1alpha1
kind: RouteGrant
metadata: {name: wide, namespace: payments, labels: {team: batch}}
spec:
  target: {protectedService: payments-api}
  subjects:
    - token: {issuer: demo-issuer, subject: batch}
    - token: {issuer: demo-issuer, subject: never-seen}
  rules: [{methods: ["*"], paths: ["/**"]}]
  expiresAt: "2026-07-01T00:00:00Z"
  reason: the batch job, granted everything "for now"
"""


def _manifests(namespace: str) -> str:
    texts = [p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))] + [WIDE_GRANT]
    return "\n---\n".join(texts).replace("namespace: payments", f"namespace: {namespace}")


def _audit(namespace: str) -> bytes:
    def line(n: int, who: Identity, method: str, path: str, grant: str) -> bytes:
        return audit_line(
            START + n, f"{n:016x}", "allow", "allowed", method, path, "http://up", 200, 1.0,
            "sha256:0", who, f"{namespace}/{grant}",
        )  # fmt: skip

    lines = [line(n, CI, "GET", f"/v1/payments/{n}", "ci-deploy") for n in range(10)]
    batch = [("GET", f"/v1/jobs/{n}/") for n in range(12)] + [
        ("PROPFIND", "/dav/a*b"),
        ("POST", "/v1/jobs"),
        ("DELETE", "/v1/jobs/123e4567-e89b-12d3-a456-426614174000"),
    ] + [("GET", f"/v1/reports/{name}") for name in "abcdefghij"]  # fmt: skip
    lines += [line(100 + n, BATCH, m, p, "wide") for n, (m, p) in enumerate(batch)]
    return b"".join(lines)


def test_proposed_grants_are_accepted_by_the_api_server(
    control_plane: ControlPlane,
    crds_installed: list[str],
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=_manifests(namespace))
    audit = tmp_path / "audit.jsonl"
    audit.write_bytes(_audit(namespace))
    argv = ["access-review", "--cluster", "--kubeconfig", control_plane.kubeconfig]
    argv += ["-n", namespace, "--at", AT, str(audit)]

    code = main([*argv, "-o", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    grants = {g["grant"]: g for g in report["grants"]}
    assert grants[f"{namespace}/ci-deploy"]["action"] == "tighten"
    assert grants[f"{namespace}/invoice-agent"]["action"] == "delete"
    wide = grants[f"{namespace}/wide"]
    assert {f["kind"] for f in wide["findings"]} >= {"unused_method", "wide_path", "unused_subject"}

    code = main([*argv, "-o", "yaml"])
    proposals = capsys.readouterr().out
    assert code == 1
    documents = [d for d in yaml.safe_load_all(proposals) if d is not None]
    assert sorted(d["metadata"]["name"] for d in documents) == ["ci-deploy", "wide"]
    by_name = {d["metadata"]["name"]: d for d in documents}
    assert by_name["wide"]["spec"]["rules"] == [
        {"methods": ["*"], "paths": ["/dav/*"]},  # PROPFIND: only `*` names it
        {"methods": ["DELETE"], "paths": ["/v1/jobs/*"]},
        {"methods": ["GET"], "paths": ["/v1/jobs/*/", "/v1/reports/*"]},
        {"methods": ["POST"], "paths": ["/v1/jobs"]},
    ]
    assert by_name["wide"]["spec"]["subjects"] == [
        {"token": {"issuer": "demo-issuer", "subject": "batch"}}
    ]
    assert by_name["wide"]["metadata"]["labels"] == {"team": "batch"}

    for mode in ([], ["--server-side"]):
        result = control_plane.kubectl(
            "apply", *mode, "--dry-run=server", "-o", "json", "-f", "-", input=proposals
        )
        served = json.loads(result.stdout)
        items = served["items"] if served.get("kind") == "List" else [served]
        assert {i["metadata"]["name"]: i["spec"]["rules"] for i in items} == {
            name: d["spec"]["rules"] for name, d in by_name.items()
        }
    # The dry run changed nothing: the cluster still holds today's grants.
    today = control_plane.kubectl("get", "routegrant", "wide", "-n", namespace, "-o", "json")
    assert json.loads(today.stdout)["spec"]["rules"] == [{"methods": ["*"], "paths": ["/**"]}]


def test_an_unreachable_cluster_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    (tmp_path / "audit.log").write_bytes(b"")
    code = main(
        ["access-review", "--cluster", "--kubeconfig", str(kubeconfig), str(tmp_path / "audit.log")]
    )
    assert code == 2
    assert "nhigate access-review: error: --cluster:" in capsys.readouterr().err
