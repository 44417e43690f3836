"""The controller's event intake; every kopf handler delegates here.

One `Controller` per process. It turns watch events into sync requests and wires the
syncs together: `ServiceSync` (services.py) recomputes everything about one
ProtectedService X (its policy, owned objects, replica reports, bypass paths, the status
of X and of the RouteGrants targeting X) in one coalescing sync per X, so watch bursts
collapse and two syncs of X never race; `IssuerSync` (issuers.py) keeps each
IdentityIssuer's keys; Revocations are judged on their own queue here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from nhigate.api.models import Revocation, RevocationStatus
from nhigate.controller import manifests as m
from nhigate.controller.grants import grant_target
from nhigate.controller.identities import pod_account
from nhigate.controller.issuers import IssuerSync
from nhigate.controller.revocations import parse_revocation, revocation_verdict
from nhigate.controller.services import ServiceSync, retrieve
from nhigate.controller.settings import ControllerSettings
from nhigate.controller.status_writer import StatusWriter
from nhigate.controller.workqueue import Aspect, Key, WorkQueue
from nhigate.k8s import PROTECTEDSERVICES, REVOCATIONS, KubeClient

JSON = dict[str, Any]


def _meta(obj: Mapping[str, Any]) -> JSON:
    meta: JSON = obj.get("metadata") or {}
    return meta


def _spec(obj: Mapping[str, Any]) -> JSON:
    spec: JSON = obj.get("spec") or {}
    return spec


class Controller:
    """The event intake and wiring of one controller process."""

    def __init__(
        self,
        client: KubeClient,
        settings: ControllerSettings,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.log = logger or logging.getLogger("nhigate.controller")
        self.clock = clock
        work_queue = functools.partial(
            WorkQueue,
            retry_min=settings.retry_min,
            retry_max=settings.retry_max,
            logger=self.log,
            clock=clock,
        )  # every queue retries with the same backoff and reads the one clock
        self.status = StatusWriter(
            client, field_manager=settings.field_manager, logger=self.log, clock=clock
        )
        self.issuers = IssuerSync(
            client,
            settings,
            status=self.status,
            work_queue=work_queue,
            keys_changed=lambda namespace: self._request_namespace(namespace, Aspect.POLICY),
            logger=self.log,
            clock=clock,
        )
        self.services = ServiceSync(
            client,
            settings,
            status=self.status,
            issuers=self.issuers,
            work_queue=work_queue,
            logger=self.log,
            clock=clock,
        )
        self.queue = self.services.queue
        self.revocation_queue = work_queue(self._sync_revocation)
        self._generations: dict[tuple[str, str, str], int] = {}

    async def close(self) -> None:
        """Stop every worker and timer; close the JWKS HTTP session."""
        await self.services.close()
        await self.issuers.close()
        await self.revocation_queue.close()

    # -- entry points (called by handlers.py) -------------------------------------------------

    async def reconcile_service(self, namespace: str, name: str) -> None:
        """Full reconcile of one ProtectedService. A failed sync is logged by the work queue,
        which retries it with its own backoff: the one retry mechanism (kopf is not asked to
        retry on top of it)."""
        self.services.names[namespace].add(name)
        with contextlib.suppress(Exception):
            await self.queue.request((namespace, name), Aspect.ALL)

    def service_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """Track which ProtectedServices exist; a deletion re-judges the grants targeting it."""
        namespace, name = str(_meta(body).get("namespace")), str(_meta(body).get("name"))
        if event_type == "DELETED":
            self.services.names[namespace].discard(name)
            self._request((namespace, name), Aspect.POLICY)
        else:
            self.services.names[namespace].add(name)

    def grant_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A RouteGrant changed: recompile its target's policy now (and its old target's)."""
        namespace, name = str(_meta(body).get("namespace")), str(_meta(body).get("name"))
        target = grant_target(body)
        previous = self.services.grant_targets.get((namespace, name))
        if event_type == "DELETED":
            self.services.grant_targets.pop((namespace, name), None)
            self._generations.pop(("RouteGrant", namespace, name), None)
        else:
            if not self._spec_changed("RouteGrant", body) and previous == target:
                return  # a status or metadata write (often our own): nothing to recompile
            if target:
                self.services.grant_targets[(namespace, name)] = target
        for affected in {target, previous} - {None}:
            self._request((namespace, str(affected)), Aspect.POLICY)

    async def revocation_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A Revocation changed: recompile what it covers, and judge it on its own queue."""
        namespace = str(_meta(body).get("namespace"))
        if event_type != "DELETED" and not self._spec_changed("Revocation", body):
            return
        target = (_spec(body).get("target") or {}).get("protectedService")
        names = {str(target)} if target else set(self.services.names[namespace])
        if event_type == "DELETED":
            names = set(self.services.names[namespace])  # the old target is unknown: all of them
            self._generations.pop(("Revocation", namespace, str(_meta(body).get("name"))), None)
        for name in names:
            self._request((namespace, name), Aspect.POLICY)
        key = (namespace, str(_meta(body).get("name")))
        if event_type == "DELETED":
            self.revocation_queue.forget(key)
        else:
            self.revocation_queue.request(key, Aspect.POLICY).add_done_callback(retrieve)

    def issuer_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """An IdentityIssuer changed or went away: recompile the services in its namespace."""
        namespace, name = str(_meta(body).get("namespace")), str(_meta(body).get("name"))
        if event_type == "DELETED":
            self.issuers.forget(namespace, name)
            self._generations.pop(("IdentityIssuer", namespace, name), None)
        elif not self._spec_changed("IdentityIssuer", body):
            return
        self._request_namespace(namespace, Aspect.POLICY | Aspect.INFRA)

    def lease_event(self, body: Mapping[str, Any]) -> None:
        """A proxy replica reported (or stopped reporting) its policy version."""
        labels = _meta(body).get("labels") or {}
        name = labels.get(m.LABEL_PROTECTED_SERVICE)
        if name:
            self._request((str(_meta(body).get("namespace")), str(name)), Aspect.ENFORCEMENT)

    def owned_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """An object we own changed: re-read the proxy's state; re-apply if it was tampered with."""
        meta = _meta(body)
        name = (meta.get("labels") or {}).get(m.LABEL_PROTECTED_SERVICE)
        if not name:
            return
        key = (str(meta.get("namespace")), str(name))
        aspects = Aspect.ENFORCEMENT
        if event_type == "DELETED":
            aspects |= Aspect.INFRA
        elif body.get("kind") == "ConfigMap" and str(meta.get("name", "")).endswith("-policy"):
            served = (meta.get("annotations") or {}).get(m.POLICY_VERSION_ANNOTATION)
            if self.services.serves_own_policy(key, served):
                return
            aspects = Aspect.POLICY | Aspect.INFRA  # someone else wrote our policy: restore it
        self._request(key, aspects)

    def service_account_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A ServiceAccount a grant names was created or deleted: republish the live
        identities of the services that grant it (its old UID is retired at once)."""
        meta = _meta(body)
        account = (str(meta.get("namespace")), str(meta.get("name")))
        self.services.identities.changed(event_type, account, meta.get("uid"))

    def pod_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A pod running as a granted service account was deleted: its pod-bound tokens end."""
        if event_type == "DELETED":
            self.services.identities.changed(event_type, pod_account(body), _meta(body).get("uid"))

    def network_event(self, namespace: str | None) -> None:
        """NetworkPolicy/Service/Ingress/HTTPRoute/Pod/Namespace change: re-run bypass analysis."""
        if namespace is None:  # a Namespace's labels matter to namespaceSelectors everywhere
            for ns in list(self.services.names):
                self._request_namespace(ns, Aspect.BYPASS)
        else:
            self._request_namespace(namespace, Aspect.BYPASS)

    async def reconcile_issuer(self, namespace: str, name: str) -> None:
        """Fetch and validate an IdentityIssuer's keys now; write its status; keep refreshing."""
        await self.issuers.reconcile(namespace, name)

    # -- requests -----------------------------------------------------------------------------

    def _request(self, key: Key, aspects: Aspect) -> None:
        self.services.request(key, aspects)

    def _request_namespace(self, namespace: str, aspects: Aspect) -> None:
        self.services.request_namespace(namespace, aspects)

    def _spec_changed(self, kind: str, body: Mapping[str, Any]) -> bool:
        meta = _meta(body)
        key = (kind, str(meta.get("namespace")), str(meta.get("name")))
        generation = int(meta.get("generation") or 0)
        if self._generations.get(key) == generation and generation:
            return False
        self._generations[key] = generation
        return True

    # -- Revocations --------------------------------------------------------------------------

    async def _sync_revocation(self, key: Key, aspects: Aspect) -> None:
        body = await self.client.get(REVOCATIONS, key[1], key[0])
        if body is None:
            self.revocation_queue.forget(key)
            return
        await self._judge_revocation(body)

    async def _judge_revocation(self, body: Mapping[str, Any]) -> None:
        namespace = str(_meta(body).get("namespace"))
        parsed = parse_revocation(body)
        if isinstance(parsed, Revocation):
            target = parsed.spec.target
            found = target is None or bool(
                await self.client.get(PROTECTEDSERVICES, target.protected_service, namespace)
            )
            verdict = revocation_verdict(parsed, target_found=found)
        else:
            verdict = parsed
        fields = RevocationStatus(observed_generation=_meta(body).get("generation"))
        await self.status.apply(REVOCATIONS, body, fields, [verdict])
