"""The pure judgements of a ProtectedService sync: its status from what was observed, the
isolation plan from its backend as read, and the JSON a status model is written as."""

from __future__ import annotations

import logging
from typing import Any, cast

from nhigate.api.models import BypassPath, ProtectedService
from nhigate.controller.owned import plan_isolation
from nhigate.controller.protocols import resolve_backend_protocol
from nhigate.controller.status import (
    Problem,
    ReplicaReport,
    invalid_service_status,
    service_status,
)
from nhigate.controller.status_writer import StatusWriter, status_json
from nhigate.k8s import KubeClient

NOW = 1_800_000_000.0
ENDPOINT = "http://nhigate-api.team.svc:8443"
AVAILABLE = {"spec": {"replicas": 2}, "status": {"availableReplicas": 2}}
CURRENT = [ReplicaReport("a", "v1", NOW + 10), ReplicaReport("b", "v1", NOW + 10)]


def _ps(mode: str = "Enforce", generation: int | None = 4) -> ProtectedService:
    meta: dict[str, Any] = {"name": "api", "namespace": "team", "uid": "u-1"}
    if generation is not None:
        meta["generation"] = generation
    return ProtectedService.model_validate(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": meta,
            "spec": {
                "backend": {"service": "backend", "port": 80},
                "issuers": ["ci"],
                "isolation": {"mode": mode},
            },
        }
    )


def _status(ps: ProtectedService, **observed: Any) -> Any:
    facts: dict[str, Any] = {
        "deployment": AVAILABLE,
        "replicas": CURRENT,
        "version": "v1",
        "problems": [],
        "policy_error": None,
        "bypass": [],
        "endpoint": ENDPOINT,
        "protocol": resolve_backend_protocol(ps, {"port": 80}),
    }
    return service_status(ps, **{**facts, **observed})


def _writer() -> StatusWriter:
    client = cast(KubeClient, object())  # render() never talks to the API server
    return StatusWriter(client, field_manager="t", logger=logging.getLogger("t"), clock=lambda: NOW)


def test_a_healthy_service_is_ready_and_its_fields_are_the_stored_shape() -> None:
    status = _status(_ps())
    assert [(d["type"], d["status"]) for d in status.desired] == [
        ("Ready", "True"),
        ("ProxyAvailable", "True"),
        ("PolicyEnforced", "True"),
        ("DirectPathBlocked", "True"),
        ("BackendProtocolResolved", "True"),
    ]
    assert status_json(status.fields) == {
        "bypassPaths": [],
        "enforcedReplicas": "2/2",
        "endpoint": ENDPOINT,
        "policyVersion": "v1",
        "backendProtocol": "HTTP/1.1",
        "observedGeneration": 4,
    }


def test_problems_come_first_in_ready_and_a_policy_error_is_one_of_them() -> None:
    problem = Problem("BackendNotFound", "spec.backend.service: Service backend not found")
    status = _status(_ps(), problems=[problem], policy_error="cannot compile")
    ready = status.desired[0]
    assert (ready["status"], ready["reason"]) == ("False", "BackendNotFound")
    assert ready["message"] == f"{problem.message}; cannot compile"
    alone = _status(_ps(), policy_error="cannot compile").desired[0]
    assert (alone["status"], alone["reason"], alone["message"]) == (
        "False",
        "Error",
        "cannot compile",
    )


def test_nothing_is_claimed_that_was_not_observed() -> None:
    status = _status(
        _ps(generation=None), version=None, replicas=[], deployment=None, bypass=None, protocol=None
    )
    assert status_json(status.fields) == {
        "bypassPaths": [],
        "enforcedReplicas": "0/0",
        "endpoint": ENDPOINT,
    }  # no policyVersion, no observedGeneration, no backendProtocol
    assert "BackendProtocolResolved" not in {d["type"] for d in status.desired}
    by_type = {d["type"]: d for d in status.desired}
    assert by_type["Ready"]["status"] == "False"
    assert by_type["PolicyEnforced"]["status"] == "False"
    assert by_type["DirectPathBlocked"]["status"] == "Unknown"


def test_bypass_paths_are_written_whole_even_with_empty_fields() -> None:
    path = BypassPath(kind="Ingress", namespace="", name="web", reason="")
    status = _status(_ps(), bypass=[path])
    assert status_json(status.fields)["bypassPaths"] == [
        {"kind": "Ingress", "namespace": "", "name": "web", "reason": ""}
    ]
    assert status.desired[3]["status"] == "False"


def test_an_invalid_service_gets_ready_false_and_no_other_field() -> None:
    status = invalid_service_status("spec.backend: Field required")
    rendered = _writer().render({"metadata": {"generation": 2}}, status.fields, status.desired)
    assert rendered == {
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Error",
                "message": "invalid spec: spec.backend: Field required",
                "lastTransitionTime": "2027-01-15T08:00:00Z",
                "observedGeneration": 2,
            }
        ]
    }


def test_render_keeps_the_transition_time_of_an_unchanged_condition() -> None:
    earlier = {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "old",
        "lastTransitionTime": "2020-01-01T00:00:00Z",
        "observedGeneration": 1,
    }
    body = {"metadata": {"generation": 4}, "status": {"conditions": [earlier]}}
    status = _status(_ps())
    rendered = _writer().render(body, status.fields, status.desired)
    ready = rendered["conditions"][0]
    assert ready["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert (ready["message"], ready["observedGeneration"]) == (
        "the proxy is deployed and available",
        4,
    )
    assert [x["type"] for x in rendered["conditions"]] == [
        "Ready",
        "ProxyAvailable",
        "PolicyEnforced",
        "DirectPathBlocked",
        "BackendProtocolResolved",
    ]


BACKEND = {"spec": {"selector": {"app": "backend"}, "ports": [{"port": 80}]}}


def test_isolation_is_deleted_unless_enforced() -> None:
    for mode in ("Audit", "Off"):
        plan = plan_isolation(_ps(mode), BACKEND, {"port": 80})
        assert (plan.delete, plan.manifest, plan.problem) == (True, None, None)


def test_an_unread_backend_keeps_the_isolation_that_exists() -> None:
    for backend, port in ((None, None), (BACKEND, None)):
        plan = plan_isolation(_ps(), backend, port)
        assert (plan.delete, plan.manifest, plan.problem) == (False, None, None)


def test_enforced_isolation_admits_the_proxy_to_the_target_port() -> None:
    plan = plan_isolation(_ps(), BACKEND, {"port": 80, "targetPort": "http", "protocol": "TCP"})
    assert plan.manifest is not None
    assert (plan.delete, plan.problem) == (False, None)
    spec = plan.manifest["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app": "backend"}}
    assert spec["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]
    plain = plan_isolation(_ps(), BACKEND, {"port": 80})
    assert plain.manifest is not None
    assert plain.manifest["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 80}]


def test_a_backend_without_selector_is_a_problem_not_an_open_namespace() -> None:
    plan = plan_isolation(_ps(), {"spec": {"ports": [{"port": 80}]}}, {"port": 80})
    assert (plan.delete, plan.manifest) == (False, None)
    assert plan.problem is not None
    assert plan.problem.reason == "Error"
    assert "has no selector" in plan.problem.message


async def test_an_event_is_stamped_by_the_writers_clock() -> None:
    """Events and conditions read one clock: the one the controller injects."""
    created: list[dict[str, Any]] = []

    class _Client:
        async def create(self, body: dict[str, Any]) -> None:
            created.append(body)

    writer = StatusWriter(
        cast(KubeClient, _Client()), field_manager="t", logger=logging.getLogger("t"),
        clock=lambda: NOW,
    )  # fmt: skip
    involved = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "n"}}
    await writer.post_event(involved, "Warning", "BypassFound", "m")
    (event,) = created
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2027-01-15T08:00:00Z"
