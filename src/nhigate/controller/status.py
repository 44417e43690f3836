"""Pure status computation: conditions from what was observed, never from what was hoped.

Every function here takes plain observed facts (Lease objects, a Deployment, bypass
paths, the set of grants each policy version contains) and returns condition dicts
in the API's JSON shape. Nothing here talks to the API server, so each rule
("Enforced only when every live replica serves a version containing the grant")
is unit-tested directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nhigate.api import conditions as c
from nhigate.api.models import BypassPath, ProtectedService, ProtectedServiceStatus
from nhigate.controller.protocols import ProtocolResolution
from nhigate.policy import Grant
from nhigate.policy.times import format_seconds, parse_optional

JSON = dict[str, Any]


def condition(type_: str, status: bool | str, reason: str, message: str) -> JSON:
    """A condition without its transition time (added by `merge_conditions`)."""
    value = status if isinstance(status, str) else (c.TRUE if status else c.FALSE)
    return {"type": type_, "status": value, "reason": reason, "message": message}


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    desired: Iterable[JSON],
    *,
    now: float,
    generation: int | None,
) -> list[JSON]:
    """`previous` with each desired condition set (transition time kept unless status changed)."""
    merged: list[JSON] = [dict(c) for c in previous or ()]
    moment = datetime.fromtimestamp(now, tz=UTC)
    for cond in desired:
        merged = c.set_condition(
            merged,
            type=cond["type"],
            status=cond["status"],
            reason=cond["reason"],
            message=cond["message"],
            observed_generation=generation,
            now=moment,
        )
    return merged


# --- proxy replicas (Leases) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One proxy replica's report, read from its Lease."""

    name: str
    version: str | None
    """The policy version the replica says it serves; None if it reported none."""
    expires_at: float
    """When the report goes stale (renewTime + leaseDurationSeconds)."""


def live_replicas(leases: Iterable[Mapping[str, Any]], now: float) -> list[ReplicaReport]:
    """Replicas whose Lease was renewed within its duration, sorted by name.

    A Lease without a parseable renewTime or duration is not live (never assume).
    """
    live: list[ReplicaReport] = []
    for lease in leases:
        spec = lease.get("spec") or {}
        meta = lease.get("metadata") or {}
        renewed = parse_optional(spec.get("renewTime"))
        duration = spec.get("leaseDurationSeconds")
        if renewed is None or not isinstance(duration, int) or duration <= 0:
            continue
        expires_at = renewed + duration
        if expires_at <= now:
            continue
        name = str(spec.get("holderIdentity") or meta.get("name") or "")
        version = (meta.get("annotations") or {}).get("nhigate.io/policy-version")
        live.append(ReplicaReport(name, str(version) if version else None, expires_at))
    return sorted(live, key=lambda r: r.name)


def next_replica_expiry(replicas: Sequence[ReplicaReport]) -> float | None:
    """When the earliest live report goes stale (re-evaluate then: no event will say so)."""
    return min((r.expires_at for r in replicas), default=None)


def policy_enforced(
    replicas: Sequence[ReplicaReport], current_version: str | None
) -> tuple[JSON, str]:
    """`PolicyEnforced` for a ProtectedService and its `enforcedReplicas` ("N/M")."""
    total = len(replicas)
    if total == 0:
        return (
            condition(
                c.POLICY_ENFORCED,
                False,
                c.REASON_NO_REPLICAS,
                "no live proxy replica reports a policy",
            ),
            "0/0",
        )
    current = sum(1 for r in replicas if current_version and r.version == current_version)
    ratio = f"{current}/{total}"
    if current_version is None:
        return condition(
            c.POLICY_ENFORCED, False, c.REASON_REPLICAS_BEHIND, "no policy compiled yet"
        ), ratio
    if current == total:
        message = f"{ratio} replicas at {current_version}"
        return condition(c.POLICY_ENFORCED, True, c.REASON_ALL_REPLICAS_CURRENT, message), ratio
    behind = ", ".join(
        f"{r.name} at {r.version or 'none'}" for r in replicas if r.version != current_version
    )
    message = f"{ratio} replicas at {current_version}; behind: {behind}"
    return condition(c.POLICY_ENFORCED, False, c.REASON_REPLICAS_BEHIND, message), ratio


# --- RouteGrants -----------------------------------------------------------------------------


def grant_active(not_before: float | None, expires_at: float | None, now: float) -> JSON:
    """`Active`: inside [notBefore, expiresAt)."""
    if not_before is not None and now < not_before:
        return condition(
            c.ACTIVE, False, c.REASON_NOT_YET_VALID, f"valid from {format_seconds(not_before)}"
        )
    if expires_at is not None and now >= expires_at:
        return condition(
            c.ACTIVE, False, c.REASON_EXPIRED, f"expired at {format_seconds(expires_at)}"
        )
    until = f"until {format_seconds(expires_at)}" if expires_at is not None else "with no expiry"
    return condition(c.ACTIVE, True, c.REASON_ACTIVE, f"valid {until}")


def next_transition(not_before: float | None, expires_at: float | None, now: float) -> float | None:
    """The next moment `grant_active` changes its answer, if any."""
    upcoming = [t for t in (not_before, expires_at) if t is not None and t > now]
    return min(upcoming, default=None)


def grant_enforced(
    name: str,
    compiled: Grant | None,
    *,
    accepted: bool,
    replicas: Sequence[ReplicaReport],
    contents: Mapping[str, Mapping[str, Grant]],
) -> tuple[JSON, str]:
    """`Enforced` for one RouteGrant and its `enforcedReplicas` ("N/M").

    `compiled` is the grant as the current policy carries it (None when it is not
    in the policy: not accepted or not active). `contents` maps each policy version
    this controller compiled to the grants (by name) it contains. A replica counts
    only if its version is known and contains exactly this grant: a version we did
    not see compiled is never assumed to contain anything.
    """
    total = len(replicas)
    if not accepted:
        return condition(
            c.ENFORCED, False, c.REASON_NOT_ACCEPTED, "the grant is not accepted"
        ), f"0/{total}"
    if compiled is None:
        message = "the grant is not active, so it is not in the policy (no access is granted)"
        return condition(c.ENFORCED, False, c.REASON_PENDING, message), f"0/{total}"
    if total == 0:
        message = "no live proxy replica reports a policy"
        return condition(c.ENFORCED, False, c.REASON_NO_REPLICAS, message), "0/0"
    serving = [
        r for r in replicas if r.version and contents.get(r.version, {}).get(name) == compiled
    ]
    ratio = f"{len(serving)}/{total}"
    if len(serving) == total:
        return condition(c.ENFORCED, True, c.REASON_ENFORCED, f"{ratio} replicas serve it"), ratio
    behind = ", ".join(r.name for r in replicas if r not in serving)
    message = f"{ratio} replicas serve it; not yet: {behind}"
    return condition(c.ENFORCED, False, c.REASON_PENDING, message), ratio


# --- ProtectedService ------------------------------------------------------------------------


def proxy_available(deployment: Mapping[str, Any] | None) -> JSON:
    """`ProxyAvailable` from the proxy Deployment's observed status."""
    if deployment is None:
        return condition(
            c.PROXY_AVAILABLE, False, c.REASON_UNAVAILABLE, "the proxy Deployment does not exist"
        )
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1) or 0)
    available = int(status.get("availableReplicas") or 0)
    message = f"{available}/{wanted} proxy replicas available"
    return condition(
        c.PROXY_AVAILABLE,
        available > 0,
        c.REASON_AVAILABLE if available > 0 else c.REASON_UNAVAILABLE,
        message,
    )


def direct_path_blocked(mode: str, paths: Sequence[BypassPath] | None) -> JSON:
    """`DirectPathBlocked` from the isolation mode and the bypass analysis (`paths` None:
    not analysed, the backend Service does not exist)."""
    if paths is None:
        return condition(
            c.DIRECT_PATH_BLOCKED,
            c.UNKNOWN,
            c.REASON_BACKEND_NOT_FOUND,
            "the backend Service does not exist: nothing to analyse",
        )
    found = "; ".join(f"{p.kind} {p.namespace}/{p.name}: {p.reason}" for p in paths[:5])
    more = f" (and {len(paths) - 5} more)" if len(paths) > 5 else ""
    if mode == "Off":
        message = "isolation is off: nothing stops direct traffic to the backend"
        return condition(
            c.DIRECT_PATH_BLOCKED,
            False,
            c.REASON_ISOLATION_OFF,
            message + (f"; {found}{more}" if paths else ""),
        )
    if paths:
        return condition(
            c.DIRECT_PATH_BLOCKED,
            False,
            c.REASON_BYPASS_FOUND,
            f"{len(paths)} direct path(s): {found}{more}",
        )
    if mode == "Audit":
        message = "audit mode: no isolation NetworkPolicy is created; no other direct path found"
        return condition(c.DIRECT_PATH_BLOCKED, False, c.REASON_ISOLATION_AUDIT, message)
    return condition(
        c.DIRECT_PATH_BLOCKED,
        True,
        c.REASON_BLOCKED,
        "only the proxy (and allowFrom) reach the backend",
    )


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a ProtectedService is not Ready (reason is a Ready reason constant)."""

    reason: str
    message: str


def service_ready(problems: Sequence[Problem], available: JSON) -> JSON:
    """The summary `Ready`: reconciled without problems and the proxy is available."""
    if problems:
        first = problems[0]
        rest = "; ".join(p.message for p in problems[1:])
        return condition(
            c.READY, False, first.reason, first.message + (f"; {rest}" if rest else "")
        )
    if available["status"] != c.TRUE:
        return condition(c.READY, False, c.REASON_RECONCILING, available["message"])
    return condition(c.READY, True, c.REASON_READY, "the proxy is deployed and available")


def owned_problems(
    ps: ProtectedService,
    backend: Mapping[str, Any] | None,
    backend_port: Mapping[str, Any] | None,
    missing_issuers: Sequence[str],
    protocol: ProtocolResolution | None = None,
) -> list[Problem]:
    """What keeps `ps` from being Ready, found while applying its owned objects: its backend
    Service (`backend`, None when absent) or port (`backend_port`) missing, issuers it names
    that do not exist, a backend `protocol` that cannot be resolved."""
    problems: list[Problem] = []
    backend_ref = ps.spec.backend
    if backend is None:
        problems.append(
            Problem(
                c.REASON_BACKEND_NOT_FOUND,
                f"spec.backend.service: Service {backend_ref.service} not found",
            )
        )
    elif backend_port is None:
        problems.append(
            Problem(
                c.REASON_BACKEND_NOT_FOUND,
                f"spec.backend.port: Service {backend_ref.service} has no port {backend_ref.port}",
            )
        )
    if missing_issuers:
        names = ", ".join(missing_issuers)
        problems.append(
            Problem(c.REASON_ISSUER_NOT_FOUND, f"spec.issuers: IdentityIssuer not found: {names}")
        )
    if protocol is not None and protocol.protocol is None:
        problems.append(Problem(protocol.reason, protocol.message))
    return problems


def backend_protocol_resolved(protocol: ProtocolResolution) -> JSON:
    """`BackendProtocolResolved` from the resolution the proxy was rendered with."""
    return condition(
        c.BACKEND_PROTOCOL_RESOLVED, protocol.status, protocol.reason, protocol.message
    )


@dataclass(frozen=True)
class ServiceStatus:
    """A ProtectedService's judged status: the conditions it should have (merged into those
    already written by the writer) and every other status field."""

    desired: list[JSON]
    fields: ProtectedServiceStatus


def service_status(
    ps: ProtectedService,
    *,
    deployment: Mapping[str, Any] | None,
    replicas: Sequence[ReplicaReport],
    version: str | None,
    problems: Sequence[Problem],
    policy_error: str | None,
    bypass: Sequence[BypassPath] | None,
    endpoint: str,
    protocol: ProtocolResolution | None = None,
) -> ServiceStatus:
    """The status of `ps` given what was observed: its proxy `deployment` (None: absent),
    the live `replicas`, the policy `version` published (None: none yet), the `problems`
    found applying its owned objects, why its policy could not be compiled (`policy_error`),
    the direct paths to its backend (`bypass`, None: not analysed), its `endpoint` and the
    backend `protocol` its proxy was rendered with (None: not resolved yet)."""
    available = proxy_available(deployment)
    enforced, ratio = policy_enforced(replicas, version)
    found = [*problems, *([Problem(c.REASON_ERROR, policy_error)] if policy_error else [])]
    ready = service_ready(found, available)
    blocked = direct_path_blocked(ps.spec.isolation.mode, bypass)
    desired = [ready, available, enforced, blocked]
    if protocol is not None:
        desired.append(backend_protocol_resolved(protocol))
    fields = ProtectedServiceStatus(
        bypass_paths=list(bypass or ()),
        enforced_replicas=ratio,
        endpoint=endpoint,
        policy_version=version or None,
        backend_protocol=protocol.protocol if protocol is not None else None,
        observed_generation=ps.metadata.generation,
    )
    return ServiceStatus(desired, fields)


def invalid_service_status(message: str) -> ServiceStatus:
    """The status of a ProtectedService whose spec does not validate (`message` says why):
    not Ready, and nothing else is claimed about it."""
    ready = condition(c.READY, False, c.REASON_ERROR, f"invalid spec: {message}")
    return ServiceStatus([ready], ProtectedServiceStatus())
