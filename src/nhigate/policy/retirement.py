"""Retired identities: tokens of service accounts and pods that no longer exist.

The API server stops accepting a service-account token once its service account is
deleted (or replaced by a new one with the same name, a new UID), and a pod-bound token
once its pod is deleted. The controller publishes which of the service accounts the
grants name exist, with their UIDs, the live pods running as them and the UIDs it saw
retired (`LiveIdentities`); `retirement()` holds a token's `kubernetes.io` UIDs against it.

A UID that is neither live nor retired is judged by time: the snapshot lists everything
created before `observed_at`, so a token issued before then whose UID is not live belongs
to an identity that is gone. A token issued after it (a new pod, a new service account)
is not refused for that reason: the proxy does not know yet, and the next snapshot will.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nhigate.policy.document import LiveIdentities
from nhigate.policy.model import Identity

ISSUED_AT_RESOLUTION = 1.0
"""`iat` is whole seconds: a token with `iat` t was issued in [t, t + 1)."""


@dataclass(frozen=True, slots=True)
class LiveIndex:
    """`LiveIdentities` indexed for a per-request check."""

    observed_at: float
    accounts: Mapping[tuple[str, str], str | None]
    """(namespace, name) -> live UID (None: no such service account)."""
    pods: frozenset[str]
    retired: frozenset[str]


def index_live_identities(live: LiveIdentities) -> LiveIndex:
    """Index a snapshot: UIDs in sets, service accounts by (namespace, name)."""
    return LiveIndex(
        observed_at=live.observed_at,
        accounts={(a.namespace, a.name): a.uid for a in live.service_accounts},
        pods=frozenset(live.pods),
        retired=frozenset(live.retired),
    )


def issued_before(issued_at: float | None, moment: float) -> bool:
    """True when a token with this `iat` certainly was issued before `moment` (no `iat`:
    nothing proves it newer, so it counts as older)."""
    return issued_at is None or issued_at + ISSUED_AT_RESOLUTION <= moment


def retirement(live: LiveIndex | None, identity: Identity) -> str | None:
    """Why `identity`'s service account or pod is retired (the audit detail), or None.

    Only service accounts the snapshot covers (those the grants name) are judged; with
    no snapshot (standalone mode) nothing is.
    """
    account = identity.service_account
    if live is None or account is None:
        return None
    key = (account.namespace, account.name)
    if key not in live.accounts:
        return None
    name = f"{account.namespace}/{account.name}"
    if account.uid is None:
        return f"the token names service account {name} without its uid"
    if account.uid in live.retired:
        return f"service account {name} uid {account.uid} was deleted"
    older = issued_before(identity.issued_at, live.observed_at)
    current = live.accounts[key]
    if account.uid != current and older:
        if current is None:
            return f"service account {name} does not exist"
        return f"service account {name} uid {account.uid} was replaced by uid {current}"
    pod = account.pod_uid
    if pod is not None:
        if pod in live.retired:
            return f"pod uid {pod} (service account {name}) was deleted"
        if pod not in live.pods and older:
            return f"pod uid {pod} (service account {name}) does not exist"
    return None
