"""The live identities behind service-account subjects (`IdentityTracker`): which
service accounts and pods a service's grants name, listed, published in its policy, and
their UIDs retired the moment they go away (the pure rules are in `identities.py`)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from nhigate.api.models import RouteGrant
from nhigate.controller.identities import (
    SNAPSHOT_CLOCK_SLACK,
    SNAPSHOT_REFRESH,
    Account,
    RetiredUids,
    Snapshot,
    account_uids,
    granted_accounts,
    namespaces_of,
    pod_account,
    retire_vanished,
    same_content,
)
from nhigate.controller.workqueue import Aspect, Key
from nhigate.k8s import PODS, SERVICEACCOUNTS, KubeClient, KubeError
from nhigate.policy import LiveIdentities


@dataclass(frozen=True)
class PublishedIdentities:
    """What one service last listed and published."""

    live: LiveIdentities | None = None
    """The live service accounts and pods last published in the policy (None: never)."""
    accounts: dict[Account, str | None] = field(default_factory=dict)
    """Granted service accounts -> live UID (None: not found), as last listed."""
    pod_accounts: dict[str, Account] = field(default_factory=dict)
    """Live pod UID -> the granted service account it runs as, as last listed."""


class IdentityTracker:
    """Granted service accounts and their pods, for every ProtectedService of one process."""

    def __init__(
        self,
        client: KubeClient,
        *,
        request: Callable[[Key, Aspect], None],
        logger: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        """`request(key, aspects)` asks for a sync of service `key`."""
        self.client = client
        self.log = logger
        self.clock = clock
        self._request = request
        self._retired = RetiredUids()
        self._watchers: defaultdict[Account, set[Key]] = defaultdict(set)
        """Granted service account -> the ProtectedServices whose grants name it."""

    def changed(self, event_type: str, account: Account, uid: object) -> None:
        """A service account (or a pod running as one) was created or deleted: the services
        granting it republish their live identities (a deleted UID is retired at once)."""
        keys = self._watchers.get(account)
        if not keys or event_type not in ("ADDED", "DELETED"):
            return
        if event_type == "DELETED" and isinstance(uid, str) and uid:
            self._retired.retire(uid, account, self.clock())
        for key in list(keys):
            self._request(key, Aspect.POLICY)

    async def publish(
        self, key: Key, grants: list[RouteGrant], last: PublishedIdentities
    ) -> PublishedIdentities:
        """List the service accounts `grants` name and their pods; retire what went away
        since `last`; what service `key` publishes now (the `last` snapshot, unchanged, when
        nothing changed)."""
        accounts = granted_accounts(grants)
        self.watch(key, accounts)
        started = self.clock()  # everything created before now is in the lists below
        uids, pod_accounts = await self._list(accounts, last)
        now = self.clock()
        found = Snapshot(uids, frozenset(pod_accounts), frozenset())
        retire_vanished(self._retired, last.live, found.identities(now), last.pod_accounts, now)
        self._retired.prune(now)
        snapshot = Snapshot(uids, frozenset(pod_accounts), frozenset(self._retired.of(accounts)))
        published = last.live
        if (
            published is not None
            and same_content(published, snapshot)
            and started - published.observed_at < SNAPSHOT_REFRESH
        ):
            live = published  # same content, same time: the policy version does not move
        else:
            live = snapshot.identities(started - SNAPSHOT_CLOCK_SLACK)
        return PublishedIdentities(live, uids, pod_accounts)

    async def _list(
        self, accounts: set[Account], last: PublishedIdentities
    ) -> tuple[dict[Account, str | None], dict[str, Account]]:
        """(granted account -> live UID or None, live pod UID -> its granted account)."""
        uids: dict[Account, str | None] = {}
        pod_accounts: dict[str, Account] = {}
        for namespace in namespaces_of(accounts):
            mine = {a for a in accounts if a[0] == namespace}
            try:
                (sas, _), (pods, _) = await asyncio.gather(
                    self.client.list(SERVICEACCOUNTS, namespace),
                    self.client.list(PODS, namespace),
                )
            except KubeError as exc:
                # Keep what we knew (unknown accounts stay unjudged) rather than refuse every
                # token of the namespace or stop publishing revocations; retried next sync.
                self.log.warning("cannot list service accounts/pods in %s: %s", namespace, exc)
                uids.update({a: u for a, u in last.accounts.items() if a in mine})
                pod_accounts.update({u: a for u, a in last.pod_accounts.items() if a in mine})
                continue
            uids.update(account_uids(mine, sas))
            for pod in pods:
                uid, account = (pod.get("metadata") or {}).get("uid"), pod_account(pod)
                if uid and account in mine:
                    pod_accounts[str(uid)] = account
        return uids, pod_accounts

    def watch(self, key: Key, accounts: set[Account]) -> None:
        """Route events of `accounts` (and of their pods) to `key`, and no others."""
        for account, keys in list(self._watchers.items()):
            if account not in accounts:
                keys.discard(key)
                if not keys:
                    del self._watchers[account]
        for account in accounts:
            self._watchers[account].add(key)
