"""The one reading of token claims into an Identity, and of service-account subjects."""

from __future__ import annotations

import pytest

from nhigate.policy import IdentityKind, ServiceAccountRef
from nhigate.policy.model import (
    service_account_of_subject,
    service_account_subject,
    token_identity,
)


def test_service_account_subject_round_trips() -> None:
    subject = service_account_subject("shop", "checkout")
    assert subject == "system:serviceaccount:shop:checkout"
    assert service_account_of_subject(subject) == ("shop", "checkout")


@pytest.mark.parametrize(
    "subject",
    [
        "checkout",
        "system:serviceaccount:shop",
        "system:serviceaccount::checkout",
        "system:serviceaccount:shop:",
        "system:serviceaccount:shop:a:b",
        "System:ServiceAccount:shop:checkout",
        "system:serviceaccounts:shop",
    ],
)
def test_anything_else_is_not_a_service_account(subject: str) -> None:
    assert service_account_of_subject(subject) is None


def test_token_identity_is_a_service_account_only_when_one_is_named() -> None:
    claims = {"sub": "system:serviceaccount:shop:checkout"}
    plain = token_identity("ci", "x", claims, token_id="j1", actors=("a",), issued_at=5.0)
    assert (plain.kind, plain.service_account, plain.token_id) == (IdentityKind.JWT, None, "j1")
    assert (plain.actors, plain.issued_at, plain.claims) == (("a",), 5.0, claims)
    account = ServiceAccountRef(namespace="shop", name="checkout", uid="u1")
    sa = token_identity("k8s", claims["sub"], claims, service_account=account)
    assert (sa.kind, sa.issuer, sa.service_account) == (
        IdentityKind.SERVICE_ACCOUNT,
        "k8s",
        account,
    )
