"""Forged or corrupt audit lines cannot widen a grant or break the proposal.

The audit is input like any other: a line can be edited, injected or cut. Whatever it says,
the proposal is built from today's grant, so the worst a forged line can do is keep a rule
alive; it must never produce a wider or an invalid grant.
"""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from nhigate.api.models import RouteGrant
from nhigate.api.resources import load_resources, parse_resource
from nhigate.review.findings import ReviewSettings
from nhigate.review.records import ReadStats, read_records
from nhigate.review.report import review

EXAMPLES = load_resources([Path(__file__).resolve().parents[2] / "examples"])
NOW = 1_780_000_000.0


def _line(path: str, method: str = "GET", grant: str = "payments/ci-deploy") -> bytes:
    return (
        orjson.dumps(
            {
                "time": "2026-05-01T00:00:00Z",
                "decision": "allow",
                "reason": "allowed",
                "identity": {
                    "issuer": "demo-issuer",
                    "subject": "repo:acme/payments:ref:refs/heads/main",
                    "kind": "jwt",
                },
                "grant": grant,
                "method": method,
                "path": path,
            }
        )
        + b"\n"
    )


def _ci_proposal(*lines: bytes) -> tuple[RouteGrant | None, ReadStats]:
    stats = ReadStats()
    result = review(
        EXAMPLES, read_records([io.BytesIO(b"".join(lines))], stats), stats, ReviewSettings(NOW)
    )
    ci = next(g for g in result.grants if g.key == "payments/ci-deploy")
    if ci.proposal is None:
        return None, stats
    parsed = parse_resource(ci.proposal, "proposal")  # the CRD's schema and CEL, as models
    assert isinstance(parsed, RouteGrant)
    return parsed, stats


@pytest.mark.parametrize(
    "path",
    [
        "/v1/payments/../../admin",  # not canonical: the proxy never logs an allow like this
        "/v1/payments/./x",
        "/v1/payments/%2e%2e/admin",
        "/v1/payments//x",
        "/v1/payments/x?debug=1",
        "v1/payments/x",
        "/v1/payments/" + "a/" * 5000,
    ],
)
def test_a_forged_non_canonical_path_is_not_evidence(path: str) -> None:
    proposal, stats = _ci_proposal(_line("/v1/payments/1"), _line(path))
    assert proposal is not None
    assert [(r.methods, r.paths) for r in proposal.spec.rules] == [(["GET"], ["/v1/payments/*"])]
    assert stats.malformed == 1


def test_a_forged_allow_outside_the_grant_widens_nothing() -> None:
    proposal, _ = _ci_proposal(
        _line("/v1/payments/1"), _line("/admin/keys", "DELETE"), _line("/v1/refunds", "PUT")
    )
    assert proposal is not None
    assert [(r.methods, r.paths) for r in proposal.spec.rules] == [(["GET"], ["/v1/payments/*"])]


def test_a_forged_method_outside_the_grant_widens_nothing() -> None:
    proposal, _ = _ci_proposal(_line("/v1/payments/1", "PROPFIND"), _line("/v1/refunds", "POST"))
    assert proposal is not None
    assert [(r.methods, r.paths) for r in proposal.spec.rules] == [(["POST"], ["/v1/refunds"])]


@pytest.mark.parametrize(
    "line",
    [
        b'{"time": "yesterday", "decision": "allow", "reason": "allowed", "identity": null,'
        b' "grant": "payments/ci-deploy", "method": "GET", "path": "/v1/payments/1"}\n',
        b'{"time": "2026-05-01T00:00:00Z", "decision": "maybe", "reason": "allowed",'
        b' "identity": null, "grant": null, "method": "GET", "path": "/"}\n',
        b'{"time": "2026-05-01T00:00:00Z", "decision": "allow", "reason": 7,'
        b' "identity": null, "grant": null, "method": "GET", "path": "/"}\n',
        b'{"time": "2026-05-01T00:00:00Z", "decision": "allow", "reason": "allowed",'
        b' "identity": "root", "grant": null, "method": "GET", "path": "/"}\n',
        b"[1, 2, 3]\n",
        b'{"time": "2026-05-01T00:00:00Z", "decision": "allow", "reason": "allowed"\n',
        b"\xff\xfe not even utf-8\n",
    ],
)
def test_a_corrupt_line_is_counted_not_fatal(line: bytes) -> None:
    proposal, stats = _ci_proposal(_line("/v1/payments/1"), line)
    assert stats.malformed == 1
    assert stats.records == 1
    assert proposal is not None
