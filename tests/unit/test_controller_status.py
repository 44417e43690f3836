"""Status rules: enforcement is claimed only when observed; conditions keep transition times."""

from __future__ import annotations

from typing import Any

import pytest

from nhigate.api.models import BypassPath, ProtectedService
from nhigate.controller.status import (
    Problem,
    ReplicaReport,
    direct_path_blocked,
    grant_active,
    grant_enforced,
    live_replicas,
    merge_conditions,
    next_replica_expiry,
    next_transition,
    owned_problems,
    policy_enforced,
    proxy_available,
    service_ready,
)
from nhigate.policy import Grant, Rule, TokenSubject
from nhigate.policy.times import format_seconds

NOW = 1_800_000_000.0


def lease(name: str, version: str | None, renewed: float, duration: Any = 15) -> dict[str, Any]:
    annotations = {"nhigate.io/policy-version": version} if version else {}
    return {
        "metadata": {"name": f"nhigate-x-{name}", "annotations": annotations},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": duration,
            "renewTime": f"{format_seconds(renewed)[:-1]}.123456Z",
        },
    }


def grant(name: str = "ns/g", path: str = "/a") -> Grant:
    return Grant(
        name=name,
        subjects=(TokenSubject(issuer="iss", subject="ci"),),
        rules=(Rule(methods=frozenset({"GET"}), paths=(path,)),),
    )


def test_live_replicas_drops_stale_and_malformed_leases() -> None:
    leases = [
        lease("b", "v2", NOW - 2),
        lease("a", "v1", NOW - 14),
        lease("stale", "v1", NOW - 16),
        lease("bad-duration", "v1", NOW, duration="15"),
        {"metadata": {"name": "no-spec"}},
    ]
    live = live_replicas(leases, NOW)
    assert [(r.name, r.version) for r in live] == [("a", "v1"), ("b", "v2")]
    assert next_replica_expiry(live) == pytest.approx(NOW + 1, abs=0.2)


def test_policy_enforced_counts_only_current_replicas() -> None:
    replicas = [ReplicaReport("a", "v2", NOW + 5), ReplicaReport("b", "v1", NOW + 5)]
    cond, ratio = policy_enforced(replicas, "v2")
    assert (cond["status"], cond["reason"], ratio) == ("False", "ReplicasBehind", "1/2")
    assert "b at v1" in cond["message"]
    cond, ratio = policy_enforced(replicas[:1], "v2")
    assert (cond["status"], cond["reason"], ratio) == ("True", "AllReplicasCurrent", "1/1")
    assert cond["message"] == "1/1 replicas at v2"
    cond, ratio = policy_enforced([], "v2")
    assert (cond["status"], cond["reason"], ratio) == ("False", "NoReplicas", "0/0")


def test_grant_enforced_requires_every_live_replica_at_a_version_containing_it() -> None:
    g = grant()
    contents = {"v1": {}, "v2": {"ns/g": g}, "v3": {"ns/g": g}}
    both_new = [ReplicaReport("a", "v2", NOW), ReplicaReport("b", "v3", NOW)]
    cond, ratio = grant_enforced("ns/g", g, accepted=True, replicas=both_new, contents=contents)
    assert (cond["status"], cond["reason"], ratio) == ("True", "Enforced", "2/2")

    one_old = [ReplicaReport("a", "v2", NOW), ReplicaReport("b", "v1", NOW)]
    cond, ratio = grant_enforced("ns/g", g, accepted=True, replicas=one_old, contents=contents)
    assert (cond["status"], cond["reason"], ratio) == ("False", "Pending", "1/2")
    assert "b" in cond["message"]


def test_grant_enforced_never_trusts_unknown_versions_or_old_content() -> None:
    g = grant()
    replicas = [ReplicaReport("a", "v-unseen", NOW)]
    cond, _ = grant_enforced(
        "ns/g", g, accepted=True, replicas=replicas, contents={"v2": {"ns/g": g}}
    )
    assert cond["status"] == "False"
    # the replica serves a version that has the grant, but with its old rules
    old = grant(path="/old")
    replicas = [ReplicaReport("a", "v1", NOW)]
    cond, _ = grant_enforced(
        "ns/g", g, accepted=True, replicas=replicas, contents={"v1": {"ns/g": old}}
    )
    assert (cond["status"], cond["reason"]) == ("False", "Pending")
    # a replica that reports no version at all
    cond, _ = grant_enforced(
        "ns/g", g, accepted=True, replicas=[ReplicaReport("a", None, NOW)], contents={}
    )
    assert cond["status"] == "False"


def test_grant_enforced_no_replicas_and_not_accepted() -> None:
    g = grant()
    cond, ratio = grant_enforced("ns/g", g, accepted=True, replicas=[], contents={})
    assert (cond["status"], cond["reason"], ratio) == ("False", "NoReplicas", "0/0")
    cond, _ = grant_enforced(
        "ns/g", None, accepted=False, replicas=[ReplicaReport("a", "v", NOW)], contents={}
    )
    assert (cond["status"], cond["reason"]) == ("False", "NotAccepted")
    cond, _ = grant_enforced("ns/g", None, accepted=True, replicas=[], contents={})
    assert (cond["status"], cond["reason"]) == ("False", "Pending")


@pytest.mark.parametrize(
    ("not_before", "expires_at", "status", "reason", "transition"),
    [
        (None, None, "True", "Active", None),
        (NOW + 10, None, "False", "NotYetValid", NOW + 10),
        (NOW - 10, NOW + 10, "True", "Active", NOW + 10),
        (None, NOW, "False", "Expired", None),  # expiresAt is exclusive
        (NOW, None, "True", "Active", None),  # notBefore is inclusive
    ],
)
def test_grant_active(
    not_before: float | None,
    expires_at: float | None,
    status: str,
    reason: str,
    transition: float | None,
) -> None:
    cond = grant_active(not_before, expires_at, NOW)
    assert (cond["status"], cond["reason"]) == (status, reason)
    assert next_transition(not_before, expires_at, NOW) == transition


def test_merge_conditions_keeps_transition_time_unless_status_changes() -> None:
    first = merge_conditions(
        None,
        [{"type": "Ready", "status": "False", "reason": "Reconciling", "message": "m"}],
        now=NOW,
        generation=1,
    )
    assert first[0]["lastTransitionTime"] == format_seconds(NOW)
    assert first[0]["observedGeneration"] == 1
    same = merge_conditions(
        first,
        [{"type": "Ready", "status": "False", "reason": "Error", "message": "x"}],
        now=NOW + 60,
        generation=2,
    )
    assert same[0]["lastTransitionTime"] == format_seconds(NOW)
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("Error", 2)
    flipped = merge_conditions(
        same,
        [{"type": "Ready", "status": "True", "reason": "Ready", "message": ""}],
        now=NOW + 120,
        generation=2,
    )
    assert flipped[0]["lastTransitionTime"] == format_seconds(NOW + 120)


def test_proxy_available() -> None:
    assert proxy_available(None)["status"] == "False"
    deployment = {"spec": {"replicas": 2}, "status": {"availableReplicas": 1}}
    cond = proxy_available(deployment)
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "True",
        "Available",
        "1/2 proxy replicas available",
    )
    assert proxy_available({"spec": {"replicas": 2}, "status": {}})["reason"] == "Unavailable"


def test_direct_path_blocked() -> None:
    path = BypassPath(kind="Service", namespace="ns", name="direct", reason="type NodePort")
    assert direct_path_blocked("Enforce", [])["status"] == "True"
    cond = direct_path_blocked("Enforce", [path])
    assert (cond["status"], cond["reason"]) == ("False", "BypassFound")
    assert "Service ns/direct: type NodePort" in cond["message"]
    assert direct_path_blocked("Audit", [])["reason"] == "IsolationAudit"
    assert direct_path_blocked("Audit", [path])["reason"] == "BypassFound"
    assert direct_path_blocked("Off", [])["reason"] == "IsolationOff"
    assert direct_path_blocked("Off", [])["status"] == "False"
    unknown = direct_path_blocked("Enforce", None)  # no backend Service: nothing analysed
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "BackendNotFound")


def test_service_ready() -> None:
    available = proxy_available({"spec": {"replicas": 1}, "status": {"availableReplicas": 1}})
    unavailable = proxy_available(None)
    assert service_ready([], available)["status"] == "True"
    cond = service_ready([], unavailable)
    assert (cond["status"], cond["reason"]) == ("False", "Reconciling")
    problems = [Problem("BackendNotFound", "no Service a"), Problem("IssuerNotFound", "no b")]
    cond = service_ready(problems, available)
    assert (cond["status"], cond["reason"]) == ("False", "BackendNotFound")
    assert "no b" in cond["message"]


def _ps() -> ProtectedService:
    return ProtectedService.model_validate(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": "api", "namespace": "team"},
            "spec": {"backend": {"service": "backend", "port": 80}, "issuers": ["ci"]},
        }
    )


def test_owned_problems_name_the_missing_backend_port_and_issuers() -> None:
    service = {"spec": {"ports": [{"port": 81}]}}
    port = {"port": 80}
    assert owned_problems(_ps(), service, port, []) == []
    assert owned_problems(_ps(), None, None, []) == [
        Problem("BackendNotFound", "spec.backend.service: Service backend not found")
    ]
    assert owned_problems(_ps(), service, None, ["ci", "other"]) == [
        Problem("BackendNotFound", "spec.backend.port: Service backend has no port 80"),
        Problem("IssuerNotFound", "spec.issuers: IdentityIssuer not found: ci, other"),
    ]
