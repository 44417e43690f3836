"""Judging RouteGrants: pure functions from a grant and what it targets to its verdict.

`judge_grant` decides `Accepted` for a grant whose target exists (what CEL cannot check:
the issuers it names exist and its target trusts and can verify them, MCP rules name
declared endpoints, the target's grantPolicy is kept); `orphan_grant_status` is the status
of a grant whose target does not exist. Nothing here talks to the API server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from nhigate.api import conditions as c
from nhigate.api.compile import compile_grant, undeclared_mcp_endpoints
from nhigate.api.governance import judge_grant_policy
from nhigate.api.models import (
    GrantUsage,
    IdentityIssuer,
    ProtectedService,
    RouteGrant,
    RouteGrantStatus,
)
from nhigate.api.resources import describe_validation_error
from nhigate.controller.status import condition, grant_active
from nhigate.policy.times import parse_optional

JSON = dict[str, Any]


def grant_target(body: Mapping[str, Any]) -> str | None:
    """The name of the ProtectedService a RouteGrant body targets (None: none given)."""
    target = (((body.get("spec") or {}).get("target")) or {}).get("protectedService")
    return str(target) if target else None


def grant_window(body: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """A RouteGrant body's (`notBefore`, `expiresAt`) as epoch seconds (None: unset)."""
    spec = body.get("spec") or {}
    return parse_optional(spec.get("notBefore")), parse_optional(spec.get("expiresAt"))


def judge_grant(
    body: JSON, ps: ProtectedService, issuers: list[IdentityIssuer], now: float
) -> tuple[RouteGrant | None, JSON]:
    """(the grant if accepted, its `Accepted` condition) for a grant targeting `ps`, given
    the namespace's valid `issuers`, at `now`."""
    try:
        grant = RouteGrant.model_validate(body)
        compile_grant(grant)
    except ValidationError as exc:
        lines = describe_validation_error(exc)
        return None, condition(c.ACCEPTED, False, c.REASON_INVALID_SPEC, "; ".join(lines))
    except ValueError as exc:
        return None, condition(c.ACCEPTED, False, c.REASON_INVALID_SPEC, str(exc))
    problem = _subject_problem(grant, ps, issuers)
    if problem is not None:
        return None, condition(c.ACCEPTED, False, *problem)
    undeclared = undeclared_mcp_endpoints(grant, ps)
    if undeclared:
        message = f"MCP rules name endpoints {ps.name} does not declare in spec.mcp: "
        return None, condition(
            c.ACCEPTED, False, c.REASON_INVALID_SPEC, message + ", ".join(undeclared)
        )
    breach = judge_grant_policy(grant, ps, issuers, now=datetime.fromtimestamp(now, tz=UTC))
    if breach is not None:
        return None, condition(c.ACCEPTED, False, breach.reason, breach.message)
    return grant, condition(
        c.ACCEPTED, True, c.REASON_ACCEPTED, f"accepted for ProtectedService {ps.name}"
    )


def orphan_grant_status(
    body: Mapping[str, Any], namespace: str, name: str, now: float
) -> tuple[list[JSON], RouteGrantStatus]:
    """(desired conditions, other status fields) of a grant whose target, ProtectedService
    `name` in `namespace`, does not exist: not accepted, not enforced, usage kept."""
    message = (
        f"spec.target.protectedService: ProtectedService {name} not found in namespace {namespace}"
    )
    desired = [
        condition(c.ACCEPTED, False, c.REASON_TARGET_NOT_FOUND, message),
        grant_active(*grant_window(body), now),
        condition(c.ENFORCED, False, c.REASON_NOT_ACCEPTED, "the grant is not accepted"),
    ]
    usage = (body.get("status") or {}).get("usage")
    kept: GrantUsage | None = None
    if usage:  # kept: applying status without it would drop lastUsed
        # (one the model refuses is not one the API server would have stored: same schema)
        with contextlib.suppress(ValidationError):
            kept = GrantUsage.model_validate(usage)
    return desired, RouteGrantStatus(enforced_replicas="0/0", usage=kept)


def _subject_problem(
    grant: RouteGrant, ps: ProtectedService, issuers: list[IdentityIssuer]
) -> tuple[str, str] | None:
    """(reason, message naming the field) for the first subject the target cannot verify."""
    by_name = {i.name: i for i in issuers}
    trusted = set(ps.spec.issuers)
    kubernetes_trusted = any(
        by_name[n].spec.kubernetes is not None for n in trusted if n in by_name
    )
    target = f"ProtectedService {ps.name}"
    for index, subject in enumerate(grant.spec.subjects):
        where = f"spec.subjects[{index}]"
        if subject.token is not None:
            issuer = subject.token.issuer
            if issuer not in by_name:
                return c.REASON_ISSUER_NOT_FOUND, (
                    f"{where}.token.issuer: IdentityIssuer {issuer!r} not found "
                    f"in namespace {grant.namespace}"
                )
            if issuer not in trusted:
                return c.REASON_ISSUER_NOT_FOUND, (
                    f"{where}.token.issuer: {issuer!r} is not in {target}'s spec.issuers"
                )
        elif subject.service_account is not None and not kubernetes_trusted:
            return c.REASON_ISSUER_NOT_FOUND, (
                f"{where}.serviceAccount: {target} trusts no IdentityIssuer with kubernetes: {{}}"
            )
        elif subject.spiffe_id is not None and (
            ps.spec.proxy.tls is None or ps.spec.proxy.tls.client_ca_secret_name is None
        ):
            return c.REASON_INVALID_SPEC, (
                f"{where}.spiffeId: {target} has no spec.proxy.tls.clientCASecretName (mTLS)"
            )
    return None
