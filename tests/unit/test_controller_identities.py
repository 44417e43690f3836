"""The controller's view of the identities behind service-account subjects: which exist,
which went away, and what it publishes (in-memory API; the real one is in
tests/integration/test_retired_identities.py)."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest
from test_controller_reconcile import MemoryApi

from controller_harness import (
    backend_pod,
    backend_service,
    condition,
    issuer,
    protected_service,
    route_grant,
)
from nhigate.api.models import RouteGrant
from nhigate.controller.identities import (
    MAX_RETIRED,
    RETIRED_RETENTION,
    SNAPSHOT_CLOCK_SLACK,
    RetiredUids,
    Snapshot,
    account_uids,
    granted_accounts,
    same_content,
)
from nhigate.controller.reconcile import Controller
from nhigate.controller.settings import ControllerSettings
from nhigate.controller.workqueue import Aspect
from nhigate.k8s import PODS, SERVICEACCOUNTS

NS, SA_NS = "team", "sa-eval"


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def service_account(name: str = "ci-bot", namespace: str = SA_NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }


def client_pod(name: str, account: str = "ci-bot", namespace: str = SA_NS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"serviceAccountName": account, "containers": [{"name": "c", "image": "x"}]},
    }


def sa_grant(name: str = "ci", account: str = "ci-bot") -> dict[str, Any]:
    grant = route_grant(NS, name)
    grant["spec"]["subjects"] = [{"serviceAccount": {"namespace": SA_NS, "name": account}}]
    return grant


@pytest.fixture
def api() -> MemoryApi:
    api = MemoryApi()
    for obj in (
        issuer(NS, "cluster", kubernetes={}),
        backend_service(NS),
        backend_pod(NS),
        protected_service(NS, issuers=["cluster"]),
    ):
        api.put(obj)
    return api


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def controller(api: MemoryApi, clock: Clock) -> Any:
    ctl = Controller(api, ControllerSettings(proxy_image="img"), clock=clock)  # type: ignore[arg-type]
    yield ctl
    await ctl.close()


def identities(api: MemoryApi) -> dict[str, Any]:
    cm = api.objects[("configmaps", NS, "nhigate-api-policy")]
    doc = json.loads(gzip.decompress(base64.b64decode(cm["binaryData"]["policy.json.gz"])))
    found: dict[str, Any] = doc["identities"]
    return found


def uid_of(api: MemoryApi, plural: str, name: str) -> str:
    return str(api.objects[(plural, SA_NS, name)]["metadata"]["uid"])


async def test_deleting_and_recreating_an_account_and_deleting_a_pod_retire_their_uids(
    api: MemoryApi, controller: Controller, clock: Clock
) -> None:
    api.put(service_account())
    api.put(client_pod("worker-0"))
    api.put(client_pod("stranger", account="someone-else"))
    api.put(sa_grant())
    await controller.reconcile_service(NS, "api")
    old_sa, pod = uid_of(api, "serviceaccounts", "ci-bot"), uid_of(api, "pods", "worker-0")
    live = identities(api)
    assert live["serviceAccounts"] == [{"namespace": SA_NS, "name": "ci-bot", "uid": old_sa}]
    assert live["pods"] == [pod]  # only pods running as a granted account
    assert live["retired"] == []
    grant = api.objects[("routegrants", NS, "ci")]
    assert condition(grant, "SubjectsFound")["status"] == "True"

    # the pod is deleted: its watch event retires its UID and republishes at once
    clock.now += 5
    body = api.objects.pop((PODS.plural, SA_NS, "worker-0"))
    controller.pod_event("DELETED", body)
    await controller.queue.request((NS, "api"), Aspect.POLICY)
    live = identities(api)
    assert live["pods"] == []
    assert live["retired"] == [pod]

    # the account is deleted and recreated under the same name, with no event seen: the
    # sync's own comparison retires the old UID
    clock.now += 5
    await api.delete(SERVICEACCOUNTS, "ci-bot", SA_NS)
    api.put(service_account())
    new_sa = uid_of(api, "serviceaccounts", "ci-bot")
    await controller.queue.request((NS, "api"), Aspect.POLICY)
    live = identities(api)
    assert live["serviceAccounts"][0]["uid"] == new_sa != old_sa
    assert sorted(live["retired"]) == sorted([pod, old_sa])

    # deleted for good: the grant says its subject does not exist
    clock.now += 5
    body = api.objects.pop((SERVICEACCOUNTS.plural, SA_NS, "ci-bot"))
    controller.service_account_event("DELETED", body)
    await controller.queue.request((NS, "api"), Aspect.POLICY)
    assert identities(api)["serviceAccounts"][0]["uid"] is None
    grant = api.objects[("routegrants", NS, "ci")]
    found = condition(grant, "SubjectsFound")
    assert (found["status"], found["reason"]) == ("False", "ServiceAccountNotFound")
    assert found["message"] == (
        "spec.subjects[0].serviceAccount: ServiceAccount sa-eval/ci-bot not found"
    )
    assert condition(grant, "Accepted")["status"] == "True"  # valid; the account may come back


async def test_an_unchanged_snapshot_keeps_the_policy_version(
    api: MemoryApi, controller: Controller, clock: Clock
) -> None:
    api.put(service_account())
    api.put(sa_grant())
    await controller.reconcile_service(NS, "api")
    first = identities(api)
    applied = len(api.applied)
    clock.now += 30
    await controller.queue.request((NS, "api"), Aspect.POLICY)
    assert identities(api) == first
    assert len(api.applied) == applied  # no new policy for pod-free quiet time
    assert first["observedAt"] == "2030-03-17T17:46:38Z"  # the list time minus the slack
    assert SNAPSHOT_CLOCK_SLACK == 2.0


def test_granted_accounts_from_service_account_and_token_subjects() -> None:
    body = sa_grant()
    body["spec"]["subjects"].append(
        {"token": {"issuer": "cluster", "subject": "system:serviceaccount:other:bot"}}
    )
    body["spec"]["subjects"].append({"token": {"issuer": "ci", "subject": "deployer"}})
    grant = RouteGrant.model_validate(body)
    assert granted_accounts([grant]) == {(SA_NS, "ci-bot"), ("other", "bot")}


def test_account_uids_name_missing_and_terminating_accounts_none() -> None:
    listed = [
        {"metadata": {"namespace": "a", "name": "x", "uid": "u1"}},
        {"metadata": {"namespace": "a", "name": "y", "uid": "u2", "deletionTimestamp": "t"}},
    ]
    assert account_uids([("a", "x"), ("a", "y"), ("a", "z")], listed) == {
        ("a", "x"): "u1",
        ("a", "y"): None,
        ("a", "z"): None,
    }


def test_retired_uids_are_bounded_by_age_and_count() -> None:
    retired = RetiredUids()
    retired.retire("old", ("a", "x"), 0.0)
    retired.retire("new", ("a", "x"), RETIRED_RETENTION)
    retired.prune(RETIRED_RETENTION + 1)
    assert retired.of({("a", "x")}) == {"new"}
    assert retired.of({("a", "other")}) == set()
    for i in range(MAX_RETIRED + 5):
        retired.retire(f"u{i}", ("a", "x"), RETIRED_RETENTION)
    kept = retired.of({("a", "x")})
    assert len(kept) == MAX_RETIRED
    assert "new" not in kept
    assert f"u{MAX_RETIRED + 4}" in kept


def test_same_content_ignores_the_time_only() -> None:
    snapshot = Snapshot({("a", "x"): "u1"}, frozenset({"p"}), frozenset())
    assert same_content(snapshot.identities(1.0), snapshot)
    other = Snapshot({("a", "x"): "u2"}, frozenset({"p"}), frozenset())
    assert not same_content(other.identities(1.0), snapshot)
    assert not same_content(None, snapshot)
