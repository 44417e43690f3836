"""Which RouteGrant condition transitions deserve an Event (pure; the writer posts them)."""

from __future__ import annotations

from typing import Any

from nhigate.controller.status_writer import grant_transitions


def cond(type_: str, status: str, reason: str, message: str = "m") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def by_type(*conditions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {x["type"]: x for x in conditions}


def test_first_acceptance_and_a_rejection_are_events() -> None:
    accepted = cond("Accepted", "True", "Accepted", "accepted for ProtectedService api")
    assert grant_transitions({}, by_type(accepted)) == [
        ("Normal", "Accepted", "accepted for ProtectedService api")
    ]
    rejected = cond("Accepted", "False", "IssuerNotFound", "no issuer")
    assert grant_transitions(by_type(accepted), by_type(rejected)) == [
        ("Warning", "Rejected", "no issuer")
    ]


def test_a_new_rejection_reason_is_an_event_but_the_same_verdict_again_is_not() -> None:
    invalid = cond("Accepted", "False", "InvalidSpec")
    missing = cond("Accepted", "False", "IssuerNotFound", "gone")
    assert grant_transitions(by_type(invalid), by_type(missing)) == [
        ("Warning", "Rejected", "gone")
    ]
    assert grant_transitions(by_type(missing), by_type({**missing, "message": "other"})) == []


def test_expiry_is_an_event_once() -> None:
    active = cond("Active", "True", "Active")
    expired = cond("Active", "False", "Expired", "expired at 2030-01-01T00:00:00Z")
    assert grant_transitions(by_type(active), by_type(expired)) == [
        ("Normal", "Expired", "expired at 2030-01-01T00:00:00Z")
    ]
    assert grant_transitions(by_type(expired), by_type(expired)) == []
    assert grant_transitions(by_type(expired), by_type(active)) == []
