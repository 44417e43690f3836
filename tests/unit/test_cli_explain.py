"""`nhigate explain` / `who-can` on examples/: the answer, and a reason a user can act on."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from nhigate.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AT = "2026-05-01T00:00:00Z"
CI = "token:demo-issuer/repo:acme/payments:ref:refs/heads/main"
AGENT = "token:demo-issuer/agent:invoice-reconciler"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _explain(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return _run(capsys, "explain", "--resources", str(EXAMPLES), "--at", AT, *argv)


def _unsigned_token(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'ES256', 'kid': 'demo-issuer-2025'})}.{part(claims)}.c2ln"


def test_allowed_names_the_grant(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _explain(capsys, "--as", CI, "--claim", "job=deploy", "POST", "/v1/refunds")
    assert code == 0
    assert "ALLOWED: allowed" in out
    assert "(grant payments/ci-deploy)" in out
    assert "service:   payments/payments-api (policy sha256:" in out


def test_denied_says_which_rule_did_not_match(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _explain(
        capsys, "--as", CI, "--claim", "job=deploy", "DELETE", "/v1/payments/42"
    )
    assert code == 1
    assert "DENIED: no_matching_grant" in out
    assert "payments/ci-deploy: does not allow" in out
    assert "rule 1: method DELETE not in [GET]" in out
    assert "rule 2: path /v1/payments/42 matches none of [/v1/refunds]" in out


def test_expired_grant_is_explained_not_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "explain",
        "-r",
        str(EXAMPLES),
        "--at",
        "2031-01-01T00:00:00Z",
        "--as",
        AGENT,
        "--claim",
        "team=finance-ops",
        "GET",
        "/v1/payments/42",
    )
    assert code == 1
    assert "DENIED: grant_expired" in out
    assert "expired at 2030-01-01T00:00:00Z (now 2031-01-01T00:00:00Z)" in out


def test_missing_claim_is_pointed_out(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _explain(capsys, "--as", AGENT, "GET", "/v1/payments/42")
    assert code == 1
    assert "No grant for this service names this identity." in out
    assert "payments/invoice-agent would match, but requires claim(s) team=finance-ops" in out


def test_path_is_normalised_before_deciding(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _explain(
        capsys, "--as", CI, "--claim", "job=deploy", "GET", "/v1//payments/./x/../42"
    )
    assert code == 0
    assert "normalised to /v1/payments/42" in out


def test_unsafe_path_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _explain(
        capsys, "--as", CI, "--claim", "job=deploy", "GET", "/v1/payments%2F..%2Frefunds"
    )
    assert code == 1
    assert "DENIED: path_rejected" in out
    assert "encoded_slash" in out


def test_token_claims_are_used_and_labelled_unverified(capsys: pytest.CaptureFixture[str]) -> None:
    token = _unsigned_token(
        {
            "iss": "https://issuer.demo.nhigate.example",
            "aud": "payments-api",
            "sub": "agent:invoice-reconciler",
            "team": "finance-ops",
            "jti": "3f1c9a52-leaked-demo-token",
            "exp": 1999999999,
        }
    )
    code, out, _ = _explain(capsys, "--token", token, "GET", "/v1/payments/42")
    assert code == 1
    assert "WITHOUT signature verification" in out
    assert "DENIED: revoked" in out
    assert "revoked by Revocation payments/leaked-agent-token" in out


def test_token_for_another_audience_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    token = _unsigned_token(
        {"iss": "https://issuer.demo.nhigate.example", "aud": "orders", "sub": "x"}
    )
    code, out, _ = _explain(capsys, "--token", token, "GET", "/v1/payments/42")
    assert code == 1
    assert "DENIED: audience_mismatch" in out


@pytest.mark.parametrize(
    ("aud", "reason"),
    [(["payments-api", 5], "token_invalid"), (None, "audience_mismatch")],
    ids=["non-string member", "missing"],
)
def test_token_audience_is_judged_as_the_proxy_judges_it(
    capsys: pytest.CaptureFixture[str], aud: object, reason: str
) -> None:
    """explain predicts the proxy: a malformed `aud` is token_invalid there, not filtered."""
    claims = {"iss": "https://issuer.demo.nhigate.example", "sub": "x", "aud": aud}
    token = _unsigned_token({k: v for k, v in claims.items() if v is not None})
    code, out, _ = _explain(capsys, "--token", token, "GET", "/v1/payments/42")
    assert code == 1
    assert f"DENIED: {reason}" in out


def test_token_from_unknown_issuer_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    token = _unsigned_token({"iss": "https://evil.example", "aud": "payments-api", "sub": "x"})
    code, out, _ = _explain(capsys, "--token", token, "GET", "/v1/payments/42")
    assert code == 1
    assert "DENIED: unknown_issuer" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--as", "root", "GET", "/"], "expected serviceaccount:NS/NAME"),
        (["--as", "token:demo-issuer", "GET", "/"], "expected token:ISSUER/SUBJECT"),
        (["GET", "/"], "give exactly one of --as IDENTITY or --token JWT"),
        (["--as", CI, "--token", "a.b.c", "GET", "/"], "give exactly one of"),
        (["--token", "nope", "GET", "/"], "not a JWT"),
        (["--as", CI, "--claim", "novalue", "GET", "/"], "expected NAME=VALUE"),
        (["--as", CI, "GE T", "/"], "expected an HTTP method"),
        (["--as", CI, "--service", "orders", "GET", "/"], "no ProtectedService 'orders'"),
    ],
)
def test_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, _, err = _explain(capsys, *argv)
    assert code == 2
    assert expected in err


def test_bad_time_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys, "explain", "-r", str(EXAMPLES), "--at", "2026-01-01", "--as", CI, "GET", "/"
    )
    assert code == 2
    assert "add a timezone" in err


def test_invalid_grant_file_names_file_and_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for example in EXAMPLES.glob("*.yaml"):
        shutil.copy(example, tmp_path / example.name)
    grant = tmp_path / "grant-ci-deploy.yaml"
    grant.write_text(grant.read_text().replace('"/v1/refunds"', '"v1/refunds"'))
    code, _, err = _run(capsys, "explain", "-r", str(tmp_path), "--as", CI, "GET", "/")
    assert code == 2
    assert f'{grant}: RouteGrant ci-deploy: spec.rules[1].paths[0]: must start with "/"' in err


def test_service_is_required_when_ambiguous(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    second = (
        (EXAMPLES / "protected-service.yaml")
        .read_text()
        .replace("name: payments-api\n  namespace", "name: refunds-api\n  namespace")
    )
    (tmp_path / "second.yaml").write_text(second)
    code, _, err = _run(
        capsys, "explain", "-r", str(EXAMPLES), "-r", str(tmp_path), "--as", CI, "GET", "/"
    )
    assert code == 2
    assert "several ProtectedServices match; choose one with --service" in err


def test_who_can_lists_subjects_and_grants(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "who-can", "-r", str(EXAMPLES), "--at", AT, "GET", "/v1/payments/42"
    )
    assert code == 0
    assert "subject repo:acme/payments:ref:refs/heads/main, with job=deploy" in out
    assert "(grant payments/ci-deploy)" in out
    assert "(grant payments/invoice-agent) [until 2030-01-01T00:00:00Z]" in out


def test_who_can_drops_expired_grants_and_says_nobody(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "who-can",
        "-r",
        str(EXAMPLES),
        "--at",
        "2031-01-01T00:00:00Z",
        "GET",
        "/v1/invoices/7",
    )
    assert code == 1
    assert "Nobody may GET /v1/invoices/7 at this time." in out


def test_a_grant_refused_by_the_grant_policy_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    resources = tmp_path / "resources"
    shutil.copytree(EXAMPLES, resources)
    service = resources / "protected-service.yaml"
    text = service.read_text()
    assert "\nspec:\n" in text
    service.write_text(
        text.replace("\nspec:\n", "\nspec:\n  grantPolicy:\n    maxDuration: 1h\n", 1)
    )
    code, out, _ = _run(
        capsys,
        "explain",
        "-r",
        str(resources),
        "--at",
        AT,
        "--as",
        CI,
        "--claim",
        "job=deploy",
        "POST",
        "/v1/refunds",
    )
    assert code == 1  # refused grants are not compiled: fail closed
    assert "refused:   payments/ci-deploy: ExpiryRequired: spec.expiresAt" in out
