"""Status conditions: the vocabulary (types and reasons) and the one helper that sets them.

Every condition type here has *positive polarity*: ``status: "True"`` is the
healthy state and ``"False"`` names a problem (its reason says which) — except
`Unused`, which reports a finding: ``"True"`` says the grant allowed nothing
for its idle period (a candidate for removal), ``"Unknown"`` that the usage
reports are incomplete. Reasons
are CamelCase, as in the Kubernetes API conventions. `lastTransitionTime`
moves only when a condition's status changes; reason, message and
observedGeneration are refreshed on every write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from nhigate.policy.times import format_seconds

# --- statuses -------------------------------------------------------------------------------
TRUE: Final = "True"
FALSE: Final = "False"
UNKNOWN: Final = "Unknown"
_STATUSES = frozenset({TRUE, FALSE, UNKNOWN})

# --- condition types ------------------------------------------------------------------------
READY: Final = "Ready"
"""IdentityIssuer: keys fetched and parsed. ProtectedService: everything reconciled and serving."""
ACCEPTED: Final = "Accepted"
"""RouteGrant / Revocation: the spec is valid and what it references exists."""
ENFORCED: Final = "Enforced"
"""RouteGrant: every ready proxy replica serves a policy version that contains the grant."""
ACTIVE: Final = "Active"
"""RouteGrant: now is within [notBefore, expiresAt)."""
SUBJECTS_FOUND: Final = "SubjectsFound"
"""RouteGrant: every service account it names exists (their tokens are refused otherwise)."""
PROXY_AVAILABLE: Final = "ProxyAvailable"
"""ProtectedService: the proxy Deployment has at least one available replica."""
POLICY_ENFORCED: Final = "PolicyEnforced"
"""ProtectedService: every ready proxy replica reports the current policy version."""
DIRECT_PATH_BLOCKED: Final = "DirectPathBlocked"
"""ProtectedService: no path to the backend bypasses the proxy (see status.bypassPaths)."""
UNUSED: Final = "Unused"
"""RouteGrant: no request was allowed with it for its idle period (negative polarity)."""
BACKEND_PROTOCOL_RESOLVED: Final = "BackendProtocolResolved"
"""ProtectedService: the protocol the backend speaks is known and consistent
(`spec.backend.protocol`, `spec.websocket` and the backend Service port's `appProtocol`)."""

# --- reasons: Accepted ----------------------------------------------------------------------
REASON_ACCEPTED: Final = "Accepted"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_TARGET_NOT_FOUND: Final = "TargetNotFound"
REASON_ISSUER_NOT_FOUND: Final = "IssuerNotFound"
# Accepted=False because the target's spec.grantPolicy refuses the grant (api/governance.py):
REASON_EXPIRY_REQUIRED: Final = "ExpiryRequired"
"""grantPolicy.requireExpiry (or maxDuration) is set and the grant has no expiresAt."""
REASON_DURATION_TOO_LONG: Final = "DurationTooLong"
"""The grant's window is longer than grantPolicy.maxDuration."""
REASON_REASON_REQUIRED: Final = "ReasonRequired"
"""grantPolicy.requireReason is set and the grant's reason is absent or blank."""
REASON_ISSUER_NOT_ALLOWED: Final = "IssuerNotAllowed"
"""A subject is verified by an issuer outside grantPolicy.allowedIssuers."""
# --- reasons: Enforced ----------------------------------------------------------------------
REASON_ENFORCED: Final = "Enforced"
REASON_PENDING: Final = "Pending"
"""Not every ready replica serves a version containing the grant yet."""
REASON_NO_REPLICAS: Final = "NoReplicas"
REASON_NOT_ACCEPTED: Final = "NotAccepted"
# --- reasons: SubjectsFound (NotAccepted shared: REASON_NOT_ACCEPTED) ----------------------
REASON_FOUND: Final = "Found"
REASON_SERVICE_ACCOUNT_NOT_FOUND: Final = "ServiceAccountNotFound"
# --- reasons: Active ------------------------------------------------------------------------
REASON_ACTIVE: Final = "Active"
REASON_NOT_YET_VALID: Final = "NotYetValid"
REASON_EXPIRED: Final = "Expired"
# --- reasons: Unused -----------------------------------------------------------------------
REASON_IDLE: Final = "Idle"
"""Unused=True: no allowed request for the idle period (or ever, since creation)."""
REASON_USED: Final = "Used"
"""Unused=False: a request was allowed within the idle period."""
REASON_NOT_YET_IDLE: Final = "NotYetIdle"
"""Unused=False: never used, but younger than the idle period."""
REASON_USAGE_INCOMPLETE: Final = "UsageIncomplete"
"""Unused=Unknown: a replica's report lost data or was unreadable; nothing is claimed."""
# --- reasons: IdentityIssuer Ready ----------------------------------------------------------
REASON_KEYS_LOADED: Final = "KeysLoaded"
REASON_FETCH_FAILED: Final = "FetchFailed"
REASON_INVALID_KEYS: Final = "InvalidKeys"
# --- reasons: ProtectedService Ready --------------------------------------------------------
REASON_READY: Final = "Ready"
REASON_RECONCILING: Final = "Reconciling"
REASON_BACKEND_NOT_FOUND: Final = "BackendNotFound"
REASON_ERROR: Final = "Error"
# (IssuerNotFound is shared with Accepted: REASON_ISSUER_NOT_FOUND; AppProtocolMismatch with
# BackendProtocolResolved: REASON_APP_PROTOCOL_MISMATCH.)
# --- reasons: ProxyAvailable ----------------------------------------------------------------
REASON_AVAILABLE: Final = "Available"
REASON_UNAVAILABLE: Final = "Unavailable"
# --- reasons: PolicyEnforced (NoReplicas shared: REASON_NO_REPLICAS) ------------------------
REASON_ALL_REPLICAS_CURRENT: Final = "AllReplicasCurrent"
REASON_REPLICAS_BEHIND: Final = "ReplicasBehind"
# --- reasons: DirectPathBlocked -------------------------------------------------------------
REASON_BLOCKED: Final = "Blocked"
REASON_BYPASS_FOUND: Final = "BypassFound"
REASON_ISOLATION_AUDIT: Final = "IsolationAudit"
REASON_ISOLATION_OFF: Final = "IsolationOff"
# --- reasons: BackendProtocolResolved (BackendNotFound shared: REASON_BACKEND_NOT_FOUND) ---
REASON_DECLARED: Final = "Declared"
"""True: `spec.backend.protocol` (or `spec.websocket`, which implies HTTP/1.1) says it."""
REASON_APP_PROTOCOL: Final = "AppProtocol"
"""True: the backend Service port's `appProtocol` says it."""
REASON_DEFAULT: Final = "Default"
"""True: nothing says otherwise, so HTTP/1.1."""
REASON_APP_PROTOCOL_MISMATCH: Final = "AppProtocolMismatch"
"""False: what the spec declares disagrees with the port's `appProtocol`; the proxy
Deployment and Service are left as they were (Ready=False with the same reason)."""

MAX_MESSAGE_LENGTH: Final = 32768
"""The Kubernetes limit on a condition message; longer messages are truncated."""


def get_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type: str
) -> dict[str, Any] | None:
    """The condition of the given type (a copy), or None."""
    for condition in conditions or ():
        if condition.get("type") == type:
            return dict(condition)
    return None


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type: str) -> bool:
    """True when the condition of `type` exists with status "True"."""
    condition = get_condition(conditions, type)
    return condition is not None and condition.get("status") == TRUE


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    *,
    type: str,
    status: str,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Return a new conditions list with `type` set; the input is not modified.

    `lastTransitionTime` is `now` when the condition is new or its status
    changed, and is kept otherwise. Other conditions keep their order; a new
    one is appended.
    """
    if status not in _STATUSES:
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    if not reason or not reason[0].isupper() or not reason.isalnum():
        raise ValueError(f"condition reason must be CamelCase, got {reason!r}")
    if now.tzinfo is None:
        raise ValueError("condition times must be timezone-aware")
    moment = format_seconds(now.timestamp())
    result: list[dict[str, Any]] = []
    found = False
    for existing in conditions or ():
        if existing.get("type") != type:
            result.append(dict(existing))
            continue
        found = True
        unchanged = existing.get("status") == status and existing.get("lastTransitionTime")
        transition = existing["lastTransitionTime"] if unchanged else moment
        result.append(_condition(type, status, reason, message, observed_generation, transition))
    if not found:
        result.append(_condition(type, status, reason, message, observed_generation, moment))
    return result


def _condition(
    type_: str,
    status: str,
    reason: str,
    message: str,
    observed_generation: int | None,
    transition: str,
) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE_LENGTH],
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        condition["observedGeneration"] = observed_generation
    return condition
