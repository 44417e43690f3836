"""`nhigate access-review` on examples/ and audit lines written by the proxy's audit writer."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from nhigate.api.models import RouteGrant
from nhigate.api.resources import parse_resource
from nhigate.cli.main import main
from nhigate.policy import Identity, IdentityKind
from nhigate.proxy.audit import audit_line

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AT = "2026-06-01T00:00:00Z"
START = datetime(2026, 5, 1, tzinfo=UTC).timestamp()
CI = Identity(
    kind=IdentityKind.JWT, issuer="demo-issuer", subject="repo:acme/payments:ref:refs/heads/main"
)
AGENT = Identity(kind=IdentityKind.JWT, issuer="demo-issuer", subject="agent:invoice-reconciler")
STRANGER = Identity(kind=IdentityKind.JWT, issuer="demo-issuer", subject="agent:stranger")


def _line(
    n: int, identity: Identity | None, method: str, path: str, grant: str | None, reason: str
) -> bytes:
    allowed = reason == "allowed"
    return audit_line(
        START + 60.0 * n,
        f"{n:016x}",
        "allow" if allowed else "deny",
        reason,
        method,
        path,
        "http://127.0.0.1:28180",
        200 if allowed else 403,
        1.0,
        "sha256:0123456789abcdef",
        identity,
        grant,
    )


def _audit() -> bytes:
    ci, agent = "payments/ci-deploy", "payments/invoice-agent"
    lines = [_line(n, CI, "GET", f"/v1/payments/{n}", ci, "allowed") for n in range(20)]
    lines += [_line(30 + n, AGENT, "GET", f"/v1/invoices/{n}", agent, "allowed") for n in range(5)]
    lines += [
        _line(40 + n, STRANGER, "DELETE", "/v1/payments/42", None, "no_matching_grant")
        for n in range(4)
    ]
    lines += [_line(50, None, "GET", "/v1/payments/1", None, "credential_missing")]
    lines.insert(3, b"not an audit line\n")
    return b"".join(lines)


def _run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str, compress: bool = False
) -> tuple[int, str, str]:
    audit = tmp_path / "audit.log"
    audit.write_bytes(gzip.compress(_audit()) if compress else _audit())
    code = main(["access-review", "-r", str(EXAMPLES), "--at", AT, str(audit), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_table_names_each_finding(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, tmp_path)
    assert code == 1
    assert "30 records in 31 lines (25 allowed, 5 denied)" in out
    assert "1 lines are not audit records (lines 4 ...)" in out
    assert "payments/ci-deploy      20" in out
    assert "rule 2 (POST /v1/refunds) was never used" in out
    assert "path /v1/payments/** was only used as /v1/payments/*" in out
    assert "the grant never expires" in out
    assert "rule 1: HEAD never used (used: GET)" in out
    assert "rule 1: path /v1/payments/* was never used" in out
    assert "demo-issuer/agent:stranger  4" in out
    assert "DELETE /v1/payments/* x4" in out  # ids shown as `*`
    assert "(unauthenticated)" not in out  # one denial is below --min-denials
    assert "+    - /v1/payments/*" in out  # the diff


def test_gzip_input_gives_the_same_review(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plain = _run(capsys, tmp_path, "-o", "json")
    packed = _run(capsys, tmp_path, "-o", "json", compress=True)
    assert plain == packed


def test_stdin_is_read_when_no_file_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(gzip.compress(_audit()))))
    code = main(["access-review", "-r", str(EXAMPLES), "--at", AT, "-o", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["audit"]["records"] == 30


def test_json_is_for_tools(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, tmp_path, "--output", "json")
    report = json.loads(out)
    assert code == 1
    assert report["format"] == "nhigate.io/access-review/v1"
    grants = {g["grant"]: g for g in report["grants"]}
    ci = grants["payments/ci-deploy"]
    assert ci["action"] == "tighten"
    assert ci["requests"] == 20
    assert [r["requests"] for r in ci["rules"]] == [20, 0]
    kinds = {f["kind"] for f in ci["findings"]}
    assert kinds == {"unused_rule", "wide_path", "no_expiry"}
    wide = next(f for f in ci["findings"] if f["kind"] == "wide_path")
    assert wide["observed"] == ["/v1/payments/*"]
    assert report["deniedCallers"][0]["subject"] == "agent:stranger"
    assert report["deniedCallers"][0]["tried"] == [
        {"method": "DELETE", "path": "/v1/payments/*", "count": 4}
    ]


def test_yaml_is_valid_routegrants_that_only_tighten(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = _run(capsys, tmp_path, "--output", "yaml")
    assert code == 1
    documents = [d for d in yaml.safe_load_all(out) if d is not None]
    grants = [parse_resource(d, "proposal") for d in documents]
    assert all(isinstance(g, RouteGrant) for g in grants)
    by_name = {g.name: g for g in grants if isinstance(g, RouteGrant)}
    ci = by_name["ci-deploy"].spec
    assert [(r.methods, r.paths) for r in ci.rules] == [(["GET"], ["/v1/payments/*"])]
    agent = by_name["invoice-agent"].spec
    assert [(r.methods, r.paths) for r in agent.rules] == [(["GET"], ["/v1/invoices/*"])]
    assert agent.expires_at is not None  # times, rate limit and reason are kept
    assert agent.rate_limit is not None
    assert "resourceVersion" not in out


def test_unused_grants_are_proposed_for_deletion(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "empty.log").write_bytes(b"")
    code = main(["access-review", "-r", str(EXAMPLES), "--at", AT, str(tmp_path / "empty.log")])
    out = capsys.readouterr().out
    assert code == 1
    assert "payments/ci-deploy: unused: delete it" in out
    main(["access-review", "-r", str(EXAMPLES), "-o", "yaml", str(tmp_path / "empty.log")])
    assert "# payments/ci-deploy was not used: kubectl delete routegrant -n payments ci-deploy" in (
        capsys.readouterr().out
    )


def _resources_with(tmp_path: Path, extra: str) -> Path:
    resources = tmp_path / "resources"
    shutil.copytree(EXAMPLES, resources)
    (resources / "extra.yaml").write_text(extra)
    return resources


def test_subjects_that_cannot_authenticate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    resources = _resources_with(
        tmp_path,
        """
apiVersion: nhigate.io/v1alpha1
kind: RouteGrant
metadata: {name: orphans, namespace: payments}
spec:
  target: {protectedService: payments-api}
  subjects:
    - token: {issuer: gone-issuer, subject: x}
    - serviceAccount: {namespace: batch, name: nightly}
    - spiffeId: spiffe://example.org/batch
  rules: [{methods: [GET], paths: [/v1/payments/*]}]
  expiresAt: "2026-06-10T00:00:00Z"
""",
    )
    ready_false = (resources / "issuer.yaml").read_text() + (
        "status:\n  conditions:\n    - {type: Ready, status: 'False', reason: FetchFailed}\n"
    )
    (resources / "issuer.yaml").write_text(ready_false)
    (tmp_path / "empty.log").write_bytes(b"")
    empty = str(tmp_path / "empty.log")
    code = main(["access-review", "-r", str(resources), "--at", AT, "-o", "json", empty])
    report = json.loads(capsys.readouterr().out)
    grants = {g["grant"]: g for g in report["grants"]}
    orphans = [(f["kind"], f.get("subject")) for f in grants["payments/orphans"]["findings"]]
    assert code == 1
    assert ("issuer_missing", "token:gone-issuer/x") in orphans
    assert ("issuer_missing", "serviceaccount:batch/nightly") in orphans  # no kubernetes issuer
    assert ("no_client_ca", "spiffe://example.org/batch") in orphans
    assert not {"no_expiry", "long_window"} & {kind for kind, _ in orphans}
    ci = {f["kind"]: f for f in grants["payments/ci-deploy"]["findings"]}
    assert ci["issuer_not_ready"]["issuer"] == "demo-issuer"


def test_plots_need_matplotlib_and_say_how_to_install_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = _run(capsys, tmp_path, "--plots", str(tmp_path / "plots"))
    assert code == 2
    assert out == ""
    assert "--plots needs matplotlib: pip install 'nhigate[plots]'" in err
    assert not (tmp_path / "plots").exists()


def test_plots_are_one_png_per_service(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, tmp_path, "--plots", str(tmp_path / "plots"))
    png = tmp_path / "plots" / "payments__payments-api.png"
    assert code == 1
    assert f"wrote {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--service", "payments-api"], "expected NAMESPACE/NAME"),
        (["--min-denials", "0"], "must be at least 1"),
        (["--kubeconfig", "/nonexistent"], "--kubeconfig needs --cluster"),
        (["/nonexistent/audit.log"], "/nonexistent/audit.log: cannot read"),
    ],
)
def test_bad_input_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["access-review", "-r", str(EXAMPLES), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_missing_kubeconfig_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "audit.log").write_bytes(b"")
    argv = ["--cluster", "--kubeconfig", str(tmp_path / "none"), str(tmp_path / "audit.log")]
    code = main(["access-review", *argv])
    assert code == 2
    assert "nhigate access-review: error: --cluster: cannot read the resources" in (
        capsys.readouterr().err
    )


def test_a_truncated_gzip_file_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "cut.gz").write_bytes(gzip.compress(_audit())[:-20])
    code = main(["access-review", "-r", str(EXAMPLES), str(tmp_path / "cut.gz")])
    assert code == 2
    assert "error: reading the audit" in capsys.readouterr().err
