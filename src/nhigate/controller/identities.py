"""Which identities behind the grants' service-account subjects still exist.

The controller lists the service accounts the grants of a ProtectedService name and the
pods running as them, and publishes the result in the policy document
(`LiveIdentities`, judged per request by `nhigate.policy.retirement`). UIDs it sees go
away — a deleted service account or pod, or a service account replaced by a new one of
the same name — are remembered in `RetiredUids` for `RETIRED_RETENTION` seconds, so their
tokens are refused at once, however recently they were minted. Pure, except for the
store's own dictionary.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nhigate.api import conditions as c
from nhigate.api.models import RouteGrant
from nhigate.controller.status import condition
from nhigate.policy import LiveIdentities, LiveServiceAccount
from nhigate.policy.model import service_account_of_subject

JSON = dict[str, Any]
Account = tuple[str, str]
"""(namespace, name) of a service account."""

RETIRED_RETENTION = 600.0
"""Seconds a retired UID stays listed. Afterwards a token of it is still refused by time:
it was issued before the deletion, long before any snapshot taken since."""
MAX_RETIRED = 10_000
"""Most retired UIDs kept (oldest dropped first), bounding the document under pod churn."""
SNAPSHOT_CLOCK_SLACK = 2.0
"""Seconds `observedAt` is set before the list: allows for the API server's clock (which
stamps `iat`) running ahead of the controller's."""
SNAPSHOT_REFRESH = 300.0
"""An unchanged snapshot keeps its `observedAt` (so the policy version does not move)
until it is this old; then the next policy sync republishes it."""


def granted_accounts(grants: Iterable[RouteGrant]) -> set[Account]:
    """Service accounts the grants name: `serviceAccount` subjects and `token` subjects
    whose `subject` is a service account's (`system:serviceaccount:NS:NAME`)."""
    accounts: set[Account] = set()
    for grant in grants:
        for subject in grant.spec.subjects:
            if subject.service_account is not None:
                accounts.add((subject.service_account.namespace, subject.service_account.name))
            elif subject.token is not None and subject.token.subject:
                account = service_account_of_subject(subject.token.subject)
                if account is not None:
                    accounts.add(account)
    return accounts


def _meta(obj: Mapping[str, Any]) -> JSON:
    meta: JSON = obj.get("metadata") or {}
    return meta


def pod_account(pod: Mapping[str, Any]) -> Account:
    """(namespace, service account) a pod runs as (`default` when unset, as Kubernetes does)."""
    spec = pod.get("spec") or {}
    name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return (str(_meta(pod).get("namespace")), str(name))


def account_uids(
    accounts: Iterable[Account], service_accounts: Iterable[Mapping[str, Any]]
) -> dict[Account, str | None]:
    """The live UID of each account (None: it does not exist) from listed ServiceAccounts."""
    listed = {
        (str(_meta(sa).get("namespace")), str(_meta(sa).get("name"))): _meta(sa).get("uid")
        for sa in service_accounts
        if not _meta(sa).get("deletionTimestamp")
    }
    return {a: (str(listed[a]) if listed.get(a) else None) for a in accounts}


class RetiredUids:
    """UIDs of service accounts and pods seen to go away, with when and whose they were."""

    def __init__(self) -> None:
        self._uids: OrderedDict[str, tuple[Account, float]] = OrderedDict()

    def retire(self, uid: str, account: Account, at: float) -> None:
        """Remember `uid` (of `account`, or of a pod running as it) as retired at `at`."""
        if uid in self._uids:
            return
        self._uids[uid] = (account, at)
        while len(self._uids) > MAX_RETIRED:
            self._uids.popitem(last=False)

    def prune(self, now: float) -> None:
        """Forget UIDs retired more than `RETIRED_RETENTION` seconds ago."""
        while self._uids:
            _, (_, at) = next(iter(self._uids.items()))
            if now - at <= RETIRED_RETENTION:
                break
            self._uids.popitem(last=False)

    def of(self, accounts: set[Account]) -> set[str]:
        """Retired UIDs belonging to `accounts`."""
        return {uid for uid, (account, _) in self._uids.items() if account in accounts}


def retire_vanished(
    retired: RetiredUids,
    before: LiveIdentities | None,
    after: LiveIdentities,
    pod_accounts: Mapping[str, Account],
    now: float,
) -> None:
    """Retire what `before` listed as live and `after` does not: replaced or deleted service
    accounts, and deleted pods (a backstop for deletions whose watch event was missed)."""
    if before is None:
        return
    live_now = {(a.namespace, a.name): a.uid for a in after.service_accounts}
    for account in before.service_accounts:
        key = (account.namespace, account.name)
        if account.uid is not None and key in live_now and live_now[key] != account.uid:
            retired.retire(account.uid, key, now)
    still = set(after.pods)
    for uid in before.pods:
        if uid not in still and uid in pod_accounts:
            retired.retire(uid, pod_accounts[uid], now)


@dataclass(frozen=True)
class Snapshot:
    """What one sync found, before it becomes `LiveIdentities`."""

    accounts: dict[Account, str | None]
    pods: frozenset[str]
    retired: frozenset[str]

    def identities(self, observed_at: float) -> LiveIdentities:
        """The snapshot as published, taken at `observed_at`."""
        return LiveIdentities(
            observed_at=observed_at,
            service_accounts=tuple(
                LiveServiceAccount(ns, name, uid)
                for (ns, name), uid in sorted(self.accounts.items())
            ),
            pods=tuple(sorted(self.pods)),
            retired=tuple(sorted(self.retired)),
        )


def same_content(published: LiveIdentities | None, snapshot: Snapshot) -> bool:
    """True when `published` lists exactly what `snapshot` found (its time aside)."""
    if published is None:
        return False
    return (
        {(a.namespace, a.name): a.uid for a in published.service_accounts} == snapshot.accounts
        and set(published.pods) == snapshot.pods
        and set(published.retired) == snapshot.retired
    )


def subjects_found(grant: RouteGrant, accounts: Mapping[Account, str | None]) -> JSON:
    """The grant's `SubjectsFound` condition: False naming every service account it grants
    that does not exist (token and SPIFFE subjects cannot be looked up)."""
    missing = [
        f"spec.subjects[{i}].serviceAccount: ServiceAccount {s.service_account.namespace}/"
        f"{s.service_account.name} not found"
        for i, s in enumerate(grant.spec.subjects)
        if s.service_account is not None
        and accounts.get((s.service_account.namespace, s.service_account.name)) is None
    ]
    if missing:
        return condition(
            c.SUBJECTS_FOUND, False, c.REASON_SERVICE_ACCOUNT_NOT_FOUND, "; ".join(missing)
        )
    return condition(c.SUBJECTS_FOUND, True, c.REASON_FOUND, "every serviceAccount subject exists")


def namespaces_of(accounts: Iterable[Account]) -> list[str]:
    """The namespaces to list, sorted."""
    return sorted({ns for ns, _ in accounts})
