"""Judging Revocations: a pure verdict (`Accepted`) from a Revocation and whether its
target exists. The controller looks the target up; nothing here talks to the API server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from nhigate.api import conditions as c
from nhigate.api.models import Revocation
from nhigate.api.resources import describe_validation_error
from nhigate.controller.status import condition

JSON = dict[str, Any]


def parse_revocation(body: Mapping[str, Any]) -> Revocation | JSON:
    """The Revocation, or (its spec being invalid) its `Accepted` False InvalidSpec condition."""
    try:
        return Revocation.model_validate(body)
    except ValidationError as exc:
        message = "; ".join(describe_validation_error(exc))
        return condition(c.ACCEPTED, False, c.REASON_INVALID_SPEC, message)


def revocation_verdict(revocation: Revocation, *, target_found: bool) -> JSON:
    """`Accepted` of a valid Revocation: False TargetNotFound when it names a
    ProtectedService that does not exist (`target_found` False), else True with its scope."""
    target = revocation.spec.target
    if target is not None and not target_found:
        return condition(
            c.ACCEPTED,
            False,
            c.REASON_TARGET_NOT_FOUND,
            f"spec.target.protectedService: ProtectedService {target.protected_service} "
            f"not found in namespace {revocation.namespace}",
        )
    scope = (
        f"ProtectedService {target.protected_service}"
        if target
        else "every ProtectedService in the namespace"
    )
    return condition(c.ACCEPTED, True, c.REASON_ACCEPTED, f"revoked for {scope}")
