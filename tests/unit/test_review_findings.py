"""The judgements of the review, table-driven: who could have used a subject; how long a grant
lives."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from nhigate.api.models import RouteGrant
from nhigate.api.resources import parse_resource
from nhigate.policy import ServiceAccountSubject, SpiffeSubject, Subject, TokenSubject
from nhigate.review.findings import DAY, Kind, ReviewSettings, lifetime_findings, subject_seen

SA = "system:serviceaccount:batch:nightly"


@pytest.mark.parametrize(
    ("subject", "identity", "seen"),
    [
        (ServiceAccountSubject("batch", "nightly"), ("k8s", SA, "serviceAccount"), True),
        (ServiceAccountSubject("batch", "other"), ("k8s", SA, "serviceAccount"), False),
        (ServiceAccountSubject("batch", "nightly"), ("k8s", SA, "jwt"), False),
        # a service-account identity whose subject is not the usual form: cannot rule it out
        (ServiceAccountSubject("batch", "nightly"), ("k8s", "odd", "serviceAccount"), True),
        (TokenSubject("k8s", SA), ("k8s", SA, "serviceAccount"), True),
        (TokenSubject("idp", "alice"), ("idp", "alice", "jwt"), True),
        (TokenSubject("idp", "alice"), ("idp", "bob", "jwt"), False),
        (TokenSubject("idp", "alice"), ("other", "alice", "jwt"), False),
        # claims are not in the audit: a claims-only subject is seen by any caller of its issuer
        (TokenSubject("idp", None, (("team", "red"),)), ("idp", "bob", "jwt"), True),
        (SpiffeSubject("spiffe://x/a"), ("", "spiffe://x/a", "spiffe"), True),
        (SpiffeSubject("spiffe://x/a"), ("", "spiffe://x/b", "spiffe"), False),
        (TokenSubject("idp", "alice"), (None, None, None), False),
    ],
)
def test_subject_seen_errs_towards_yes(
    subject: Subject, identity: tuple[str | None, str | None, str | None], seen: bool
) -> None:
    assert subject_seen(subject, identity) is seen


AT = datetime(2026, 6, 1, tzinfo=UTC)


def _grant(**times: str) -> RouteGrant:
    spec: dict[str, Any] = {
        "target": {"protectedService": "svc"},
        "subjects": [{"token": {"issuer": "idp", "subject": "a"}}],
        "rules": [{"methods": ["GET"], "paths": ["/"]}],
        **times,
    }
    manifest = {"apiVersion": "nhigate.io/v1alpha1", "kind": "RouteGrant"}
    grant = parse_resource({**manifest, "metadata": {"name": "g"}, "spec": spec}, "g")
    assert isinstance(grant, RouteGrant)
    return grant


@pytest.mark.parametrize(
    ("times", "kinds"),
    [
        ({}, [Kind.NO_EXPIRY]),
        ({"expiresAt": "2026-08-30T00:00:00Z"}, []),  # 90 days from --at: not longer
        ({"expiresAt": "2026-08-31T00:00:00Z"}, [Kind.LONG_WINDOW]),
        ({"expiresAt": "2026-06-01T00:00:00Z"}, [Kind.EXPIRED]),  # expiresAt is exclusive
        ({"notBefore": "2026-08-01T00:00:00Z", "expiresAt": "2026-09-01T00:00:00Z"}, []),
        (
            {"notBefore": "2025-01-01T00:00:00Z", "expiresAt": "2026-07-01T00:00:00Z"},
            [Kind.LONG_WINDOW],
        ),
    ],
)
def test_lifetime(times: dict[str, str], kinds: list[Kind]) -> None:
    settings = ReviewSettings(at=AT.timestamp(), max_window=90 * DAY)
    assert [f.kind for f in lifetime_findings(_grant(**times), settings)] == kinds
