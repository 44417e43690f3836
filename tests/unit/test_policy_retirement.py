"""Retired identities: tokens of deleted or replaced service accounts and deleted pods.

The pure judgement (`retirement`), `decide()` on a document carrying live identities, and
the document's encoding of them.
"""

from __future__ import annotations

import json

import pytest

from nhigate.policy import (
    Facts,
    Grant,
    Identity,
    IdentityKind,
    PolicyDocumentError,
    Reason,
    Rule,
    ServiceAccountRef,
    ServiceAccountSubject,
    ServiceConfig,
    compile_policy,
    decide,
    decode_document,
    encode_document,
    make_document,
)
from nhigate.policy.document import LiveIdentities, LiveServiceAccount
from nhigate.policy.retirement import index_live_identities, issued_before, retirement

SERVICE = ServiceConfig(namespace="ns", name="api", backend_service="backend", backend_port=80)
GRANT = Grant(
    name="ns/ci",
    subjects=(ServiceAccountSubject("sa-eval", "ci-bot"),),
    rules=(Rule(frozenset({"GET"}), ("/v1/**",)),),
)
SNAPSHOT_AT = 1_800_000_000.0
SA_UID, NEW_SA_UID, POD_UID, OTHER_POD = "sa-uid-1", "sa-uid-2", "pod-uid-1", "pod-uid-9"


def live(
    uid: str | None = SA_UID, pods: tuple[str, ...] = (POD_UID,), retired: tuple[str, ...] = ()
) -> LiveIdentities:
    return LiveIdentities(
        observed_at=SNAPSHOT_AT,
        service_accounts=(LiveServiceAccount("sa-eval", "ci-bot", uid),),
        pods=pods,
        retired=retired,
    )


def identity(
    uid: str | None = SA_UID,
    pod: str | None = None,
    issued_at: float | None = SNAPSHOT_AT - 60,
    name: str = "ci-bot",
) -> Identity:
    return Identity(
        kind=IdentityKind.SERVICE_ACCOUNT,
        issuer="cluster",
        subject=f"system:serviceaccount:sa-eval:{name}",
        service_account=ServiceAccountRef("sa-eval", name, uid, pod_uid=pod),
        issued_at=issued_at,
    )


OLD = SNAPSHOT_AT - 60
NEWER = SNAPSHOT_AT + 5
EDGE = SNAPSHOT_AT - 0.5  # `iat` is whole seconds: issued in [iat, iat + 1), maybe after


@pytest.mark.parametrize(
    ("snapshot", "who", "retired"),
    [
        # the live account, its live pod: allowed
        (live(), identity(), False),
        (live(), identity(pod=POD_UID), False),
        # the account was deleted: its old tokens are refused
        (live(uid=None), identity(), True),
        (live(uid=None, retired=(SA_UID,)), identity(), True),
        # recreated under the same name (new UID): the old tokens stay refused
        (live(uid=NEW_SA_UID), identity(), True),
        (live(uid=NEW_SA_UID), identity(uid=NEW_SA_UID), False),
        # a UID the controller saw retired is refused however new the token claims to be
        (live(uid=NEW_SA_UID, retired=(SA_UID,)), identity(issued_at=NEWER), True),
        # a pod-bound token whose pod is gone
        (live(pods=()), identity(pod=POD_UID), True),
        (live(pods=(), retired=(POD_UID,)), identity(pod=POD_UID, issued_at=NEWER), True),
        (live(), identity(pod=OTHER_POD), True),
        # newer than the snapshot: a new account or pod the proxy cannot know yet
        (live(uid=None), identity(issued_at=NEWER), False),
        (live(uid=NEW_SA_UID), identity(issued_at=NEWER), False),
        (live(), identity(pod=OTHER_POD, issued_at=NEWER), False),
        (live(uid=None), identity(issued_at=EDGE), False),
        # no iat proves nothing newer: judged as older
        (live(uid=None), identity(issued_at=None), True),
        # a token without the service account's UID cannot be checked: refused
        (live(), identity(uid=None), True),
        # an account no grant names is not judged here (no grant allows it anyway)
        (live(uid=None), identity(name="other"), False),
    ],
)
def test_retirement_judges_the_uids_a_token_carries(
    snapshot: LiveIdentities, who: Identity, retired: bool
) -> None:
    detail = retirement(index_live_identities(snapshot), who)
    assert (detail is not None) is retired, detail
    if retired:
        assert "sa-eval/ci-bot" in str(detail)


def test_no_snapshot_judges_nothing() -> None:
    assert retirement(None, identity(uid="anything")) is None


def test_issued_before_counts_the_whole_second_of_iat() -> None:
    assert issued_before(SNAPSHOT_AT - 1, SNAPSHOT_AT)
    assert not issued_before(SNAPSHOT_AT - 0.999, SNAPSHOT_AT)
    assert issued_before(None, SNAPSHOT_AT)


def _facts(who: Identity) -> Facts:
    return Facts(identity=who, method="GET", path="/v1/items", now=SNAPSHOT_AT + 10)


def test_decide_refuses_a_deleted_account_before_any_grant() -> None:
    before = compile_policy(make_document(SERVICE, [], [GRANT], [], live()))
    assert decide(before, _facts(identity())).allowed
    after = compile_policy(make_document(SERVICE, [], [GRANT], [], live(uid=None)))
    decision = decide(after, _facts(identity()))
    assert not decision.allowed
    assert decision.reason is Reason.IDENTITY_RETIRED
    assert after.retirement(identity()) == "service account sa-eval/ci-bot does not exist"


def test_decide_refuses_a_token_of_a_deleted_pod() -> None:
    policy = compile_policy(make_document(SERVICE, [], [GRANT], [], live(pods=(OTHER_POD,))))
    decision = decide(policy, _facts(identity(pod=POD_UID)))
    assert decision.reason is Reason.IDENTITY_RETIRED
    assert decide(policy, _facts(identity(pod=OTHER_POD))).allowed


def test_a_document_without_identities_does_not_judge_them() -> None:
    policy = compile_policy(make_document(SERVICE, [], [GRANT], []))
    assert decide(policy, _facts(identity(uid="whatever", issued_at=None))).allowed


def test_identities_round_trip_canonically() -> None:
    snapshot = LiveIdentities(
        observed_at=SNAPSHOT_AT + 0.25,
        service_accounts=(
            LiveServiceAccount("b", "x", None),
            LiveServiceAccount("a", "y", "u1"),
        ),
        pods=("p2", "p1", "p2"),
        retired=("r2", "r1"),
    )
    doc = make_document(SERVICE, [], [GRANT], [], snapshot)
    data = encode_document(doc)
    body = json.loads(data)["identities"]
    assert body == {
        "observedAt": "2027-01-15T08:00:00.250000Z",
        "serviceAccounts": [
            {"namespace": "a", "name": "y", "uid": "u1"},
            {"namespace": "b", "name": "x", "uid": None},
        ],
        "pods": ["p1", "p2"],
        "retired": ["r1", "r2"],
    }
    assert decode_document(data) == doc
    assert encode_document(decode_document(data)) == data
    without = make_document(SERVICE, [], [GRANT], [])
    assert "identities" not in json.loads(encode_document(without))
    assert without.version != doc.version


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.update(observedAt=None), "identities.observedAt: missing time"),
        (lambda b: b.update(pods=[""]), "identities.pods[0]: expected a non-empty string"),
        (lambda b: b.update(retired=["x" * 65]), "identities.retired[0]: a UID is at most 64"),
        (lambda b: b.update(extra=1), "identities.extra: unknown field"),
        (
            lambda b: b["serviceAccounts"].append(dict(b["serviceAccounts"][0])),
            "identities.serviceAccounts[1]: duplicate service account sa-eval/ci-bot",
        ),
    ],
)
def test_bad_identities_are_rejected_naming_the_field(mutate: object, message: str) -> None:
    body = json.loads(encode_document(make_document(SERVICE, [], [GRANT], [], live())))
    mutate(body["identities"])  # type: ignore[operator]
    with pytest.raises(PolicyDocumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_document(json.dumps(body).encode())
