"""The controller's logic; every kopf handler delegates here.

One `Controller` per process. Everything about a ProtectedService X (its policy,
owned objects, replica reports, bypass paths, the status of X and of the
RouteGrants that target X) is recomputed by one coalescing sync per X
(`WorkQueue`), so watch bursts collapse and two syncs of X never race. Each sync
is level-based: it reads the cluster, computes, server-side-applies what
differs, and writes status from what it observed (`status.py`).

The policy is compiled and applied first in every sync: revocation latency is the
time from a watch event to the ConfigMap write, plus the proxies' own watch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from nhigate.api import conditions as c
from nhigate.api.compile import (
    build_policy_document,
    missing_issuers,
)
from nhigate.api.durations import parse_duration
from nhigate.api.models import BypassPath, IdentityIssuer, ProtectedService, Revocation, RouteGrant
from nhigate.api.resources import describe_validation_error
from nhigate.controller import manifests as m
from nhigate.controller.bypass import find_bypass_paths
from nhigate.controller.grants import (
    grant_target,
    grant_window,
    judge_grant,
    orphan_grant_status,
)
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
    subjects_found,
)
from nhigate.controller.issuers import IssuerSync
from nhigate.controller.jwks import assertion_public_jwks, new_assertion_key
from nhigate.controller.netpol import selector_matches
from nhigate.controller.revocations import parse_revocation, revocation_verdict
from nhigate.controller.settings import ControllerSettings
from nhigate.controller.status import (
    Problem,
    ReplicaReport,
    condition,
    direct_path_blocked,
    grant_active,
    grant_enforced,
    live_replicas,
    next_replica_expiry,
    next_transition,
    owned_problems,
    policy_enforced,
    proxy_available,
    service_ready,
)
from nhigate.controller.status_writer import StatusWriter
from nhigate.controller.usage import (
    Reports,
    grant_unused,
    grant_usage,
    read_reports,
    usage_changed_materially,
)
from nhigate.controller.workqueue import Aspect, Key, WorkQueue
from nhigate.k8s import (
    DEPLOYMENTS,
    HPAS,
    HTTPROUTES,
    IDENTITYISSUERS,
    INGRESSES,
    LEASES,
    NAMESPACES,
    NETWORKPOLICIES,
    PODS,
    PROTECTEDSERVICES,
    REVOCATIONS,
    ROUTEGRANTS,
    SECRETS,
    SERVICEACCOUNTS,
    SERVICES,
    KubeClient,
    KubeError,
    ResourceRef,
)
from nhigate.policy import Grant, LiveIdentities, PolicyDocument, pack_document
from nhigate.policy.times import parse_optional

JSON = dict[str, Any]
_VERSIONS_KEPT = 32
"""Policy versions remembered per service (replicas lagging further count as not enforcing)."""
_STATUS_WRITE_CONCURRENCY = 16
_LEASE_EXPIRY_SLACK = 0.05


def _meta(obj: Mapping[str, Any]) -> JSON:
    meta: JSON = obj.get("metadata") or {}
    return meta


def _spec(obj: Mapping[str, Any]) -> JSON:
    spec: JSON = obj.get("spec") or {}
    return spec


@dataclass
class _GrantView:
    """One RouteGrant as this sync judged it."""

    body: JSON
    accepted: JSON
    compiled: Grant | None = None
    active: JSON | None = None
    grant: RouteGrant | None = None
    """The grant as accepted (None when it was not)."""
    subjects: JSON | None = None
    """Its `SubjectsFound` condition, once the service accounts were looked up."""

    @property
    def name(self) -> str:
        return str(_meta(self.body).get("name"))

    @property
    def key(self) -> str:
        return f"{_meta(self.body).get('namespace')}/{self.name}"


@dataclass
class _Observed:
    """What the controller last observed and computed for one ProtectedService."""

    version: str | None = None
    document: bytes | None = None
    policy_error: str | None = None
    grants: list[_GrantView] = field(default_factory=list)
    missing_issuers: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    deployment: JSON | None = None
    deployment_version: str | None = None
    replicas: list[ReplicaReport] = field(default_factory=list)
    bypass: list[BypassPath] | None = None
    backend_found: bool = True
    contents: OrderedDict[str, dict[str, Grant]] = field(default_factory=OrderedDict)
    """Policy version -> the grants (by `namespace/name`) it contains, newest last."""
    identities: LiveIdentities | None = None
    """The live service accounts and pods last published in the policy."""
    accounts: dict[Account, str | None] = field(default_factory=dict)
    """Granted service accounts -> live UID (None: not found), as last listed."""
    pod_accounts: dict[str, Account] = field(default_factory=dict)
    """Live pod UID -> the granted service account it runs as, as last listed."""
    usage: Reports = field(default_factory=lambda: Reports((), True))
    """The replicas' usage reports, from every Lease of the service (live or stale)."""


class Controller:
    """The state and logic of one controller process."""

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
        self.queue = work_queue(self._sync)
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
        self.revocation_queue = work_queue(self._sync_revocation)
        self._services: defaultdict[str, set[str]] = defaultdict(set)
        self._observed: dict[Key, _Observed] = {}
        self._generations: dict[tuple[str, str, str], int] = {}
        self._grant_targets: dict[tuple[str, str], str] = {}
        self._usage_written: dict[str, float] = {}
        """Grant `namespace/name` -> when this process last wrote its `status.usage`."""
        self._httproutes_served: tuple[bool, float] | None = None
        self._retired = RetiredUids()
        self._account_watchers: defaultdict[Account, set[Key]] = defaultdict(set)
        """Granted service account -> the ProtectedServices whose grants name it."""

    async def close(self) -> None:
        """Stop every worker and timer; close the JWKS HTTP session."""
        await self.queue.close()
        await self.issuers.close()
        await self.revocation_queue.close()

    # =========================================================================================
    # Entry points (called by handlers.py)

    async def reconcile_service(self, namespace: str, name: str) -> None:
        """Full reconcile of one ProtectedService. A failed sync is logged by the work queue,
        which retries it with its own backoff: the one retry mechanism (kopf is not asked to
        retry on top of it)."""
        self._services[namespace].add(name)
        with contextlib.suppress(Exception):
            await self.queue.request((namespace, name), Aspect.ALL)

    def service_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """Track which ProtectedServices exist; a deletion re-judges the grants targeting it."""
        namespace, name = str(_meta(body).get("namespace")), str(_meta(body).get("name"))
        if event_type == "DELETED":
            self._services[namespace].discard(name)
            self._request((namespace, name), Aspect.POLICY)
        else:
            self._services[namespace].add(name)

    def grant_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A RouteGrant changed: recompile its target's policy now (and its old target's)."""
        namespace, name = str(_meta(body).get("namespace")), str(_meta(body).get("name"))
        target = grant_target(body)
        previous = self._grant_targets.get((namespace, name))
        if event_type == "DELETED":
            self._grant_targets.pop((namespace, name), None)
            self._generations.pop(("RouteGrant", namespace, name), None)
        else:
            if not self._spec_changed("RouteGrant", body) and previous == target:
                return  # a status or metadata write (often our own): nothing to recompile
            if target:
                self._grant_targets[(namespace, name)] = target
        for affected in {target, previous} - {None}:
            self._request((namespace, str(affected)), Aspect.POLICY)

    async def revocation_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A Revocation changed: recompile what it covers, and judge it on its own queue."""
        namespace = str(_meta(body).get("namespace"))
        if event_type != "DELETED" and not self._spec_changed("Revocation", body):
            return
        target = (_spec(body).get("target") or {}).get("protectedService")
        names = {str(target)} if target else set(self._services[namespace])
        if event_type == "DELETED":
            names = set(self._services[namespace])  # the old target is unknown: all of them
            self._generations.pop(("Revocation", namespace, str(_meta(body).get("name"))), None)
        for name in names:
            self._request((namespace, name), Aspect.POLICY)
        key = (namespace, str(_meta(body).get("name")))
        if event_type == "DELETED":
            self.revocation_queue.forget(key)
        else:
            self.revocation_queue.request(key, Aspect.POLICY).add_done_callback(_retrieve)

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
        observed = self._observed.get(key)
        if event_type == "DELETED":
            aspects |= Aspect.INFRA
        elif body.get("kind") == "ConfigMap" and str(meta.get("name", "")).endswith("-policy"):
            served = (meta.get("annotations") or {}).get(m.POLICY_VERSION_ANNOTATION)
            if observed is None or served == observed.version:
                return
            aspects = Aspect.POLICY | Aspect.INFRA  # someone else wrote our policy: restore it
        self._request(key, aspects)

    def service_account_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A ServiceAccount a grant names was created or deleted: republish the live
        identities of the services that grant it (its old UID is retired at once)."""
        meta = _meta(body)
        account = (str(meta.get("namespace")), str(meta.get("name")))
        self._identity_changed(event_type, account, meta.get("uid"))

    def pod_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A pod running as a granted service account was deleted: its pod-bound tokens end."""
        if event_type == "DELETED":
            self._identity_changed(event_type, pod_account(body), _meta(body).get("uid"))

    def _identity_changed(self, event_type: str, account: Account, uid: object) -> None:
        keys = self._account_watchers.get(account)
        if not keys or event_type not in ("ADDED", "DELETED"):
            return
        if event_type == "DELETED" and isinstance(uid, str) and uid:
            self._retired.retire(uid, account, self.clock())
        for key in list(keys):
            self._request(key, Aspect.POLICY)

    def network_event(self, namespace: str | None) -> None:
        """NetworkPolicy/Service/Ingress/HTTPRoute/Pod/Namespace change: re-run bypass analysis."""
        if namespace is None:  # a Namespace's labels matter to namespaceSelectors everywhere
            for ns in list(self._services):
                self._request_namespace(ns, Aspect.BYPASS)
        else:
            self._request_namespace(namespace, Aspect.BYPASS)

    async def reconcile_issuer(self, namespace: str, name: str) -> None:
        """Fetch and validate an IdentityIssuer's keys now; write its status; keep refreshing."""
        await self.issuers.reconcile(namespace, name)

    # =========================================================================================
    # Requests

    def _request(self, key: Key, aspects: Aspect) -> None:
        future = self.queue.request(key, aspects)
        future.add_done_callback(_retrieve)

    def _request_namespace(self, namespace: str, aspects: Aspect) -> None:
        for name in list(self._services.get(namespace, ())):
            self._request((namespace, name), aspects)

    def _spec_changed(self, kind: str, body: Mapping[str, Any]) -> bool:
        meta = _meta(body)
        key = (kind, str(meta.get("namespace")), str(meta.get("name")))
        generation = int(meta.get("generation") or 0)
        if self._generations.get(key) == generation and generation:
            return False
        self._generations[key] = generation
        return True

    # =========================================================================================
    # The sync of one ProtectedService

    async def _sync(self, key: Key, aspects: Aspect) -> None:
        namespace, name = key
        body = await self.client.get(PROTECTEDSERVICES, name, namespace)
        if body is None or _meta(body).get("deletionTimestamp"):
            self._observed.pop(key, None)
            self.queue.forget(key)
            self._watch_accounts(key, set())
            await self._judge_orphan_grants(namespace, name)
            return
        self._services[namespace].add(name)
        if key not in self._observed:
            aspects = Aspect.ALL  # first sync in this process: observe everything
        observed = self._observed.setdefault(key, _Observed())
        try:
            ps = ProtectedService.model_validate(body)
        except ValidationError as exc:
            await self._write_invalid_service(body, exc)
            return
        previous_version = observed.version
        if aspects & Aspect.POLICY:
            await self._compile_policy(ps, observed)
        if aspects & Aspect.INFRA:
            await self._apply_owned(ps, observed)
        elif observed.version != previous_version and observed.deployment is not None:
            await self._apply_deployment(ps, observed)  # keeps its policy-version annotation true
        if aspects & (Aspect.ENFORCEMENT | Aspect.POLICY | Aspect.INFRA):
            await self._observe_replicas(
                ps, observed, deployment_known=bool(aspects & Aspect.INFRA)
            )
        if aspects & (Aspect.BYPASS | Aspect.INFRA):
            await self._observe_bypass(ps, observed)
        await self._write_service_status(ps, body, observed)
        await self._write_grant_statuses(ps, observed)
        if aspects & Aspect.INFRA:  # level-based drift correction, without a kopf timer
            when = self.clock() + self.settings.drift_interval
            self.queue.request_at(key, Aspect.ALL, when, slot="drift")

    # -- policy -----------------------------------------------------------------------------

    async def _compile_policy(self, ps: ProtectedService, observed: _Observed) -> None:
        now = self.clock()
        namespace = ps.namespace
        (issuer_bodies, _), (grant_bodies, _), (revocation_bodies, _) = await asyncio.gather(
            self.client.list(IDENTITYISSUERS, namespace),
            self.client.list(ROUTEGRANTS, namespace),
            self.client.list(REVOCATIONS, namespace),
        )
        issuers = _parse_all(IdentityIssuer, issuer_bodies)
        revocations = _parse_all(Revocation, revocation_bodies)
        views: list[_GrantView] = []
        accepted: list[RouteGrant] = []
        for body in grant_bodies:
            if grant_target(body) != ps.name:
                continue
            self._grant_targets[(namespace, str(_meta(body).get("name")))] = ps.name
            grant, verdict = judge_grant(body, ps, issuers, now)
            views.append(_GrantView(body=body, accepted=verdict, grant=grant))
            if grant is not None:
                accepted.append(grant)
        identities = await self._live_identities((namespace, ps.name), accepted, observed)
        for view in views:
            if view.grant is not None:
                view.subjects = subjects_found(view.grant, observed.accounts)
        jwks = await self.issuers.kubernetes_keys(ps, issuers)
        moment = datetime.fromtimestamp(now, tz=UTC)
        observed.missing_issuers = missing_issuers(ps, issuers)

        def publishable(grants: list[RouteGrant]) -> tuple[PolicyDocument, bytes, JSON]:
            """The policy document with `grants`, packed, and its ConfigMap (ValueError when
            it cannot be built or is too large even packed)."""
            document = build_policy_document(
                ps, issuers, grants, revocations, now=moment, issuer_jwks=jwks,
                identities=identities,
            )  # fmt: skip
            data = pack_document(document)
            return document, data, m.build_policy_configmap(ps, data, document.version)

        try:
            document, data, manifest = publishable(accepted)
            observed.policy_error = None
        except ValueError as exc:  # e.g. too large even packed
            # Fail closed: keeping the last good policy would keep grants deleted since then
            # alive, so publish one with no grants (issuers and revocations kept) instead.
            observed.policy_error = (
                f"the policy cannot be compiled ({exc}); every request is denied until it can"
            )
            self.log.error("%s/%s: %s", namespace, ps.name, observed.policy_error)
            try:
                document, data, manifest = publishable([])
            except ValueError as deny_all_exc:
                self.log.error(
                    "%s/%s: not even a deny-all policy can be published: %s",
                    namespace,
                    ps.name,
                    deny_all_exc,
                )
                observed.grants = views
                return
        if document.version != observed.version:
            await self.client.apply(manifest, field_manager=self.settings.field_manager)
            self.log.info("%s/%s: policy %s applied", namespace, ps.name, document.version)
        observed.version, observed.document = document.version, data
        observed.contents[document.version] = {g.name: g for g in document.grants}
        observed.contents.move_to_end(document.version)
        while len(observed.contents) > _VERSIONS_KEPT:
            observed.contents.popitem(last=False)
        in_policy = observed.contents[document.version]
        transitions: list[float] = []
        for view in views:
            not_before, expires_at = grant_window(view.body)
            view.active = grant_active(not_before, expires_at, now)
            view.compiled = in_policy.get(view.key)
            upcoming = next_transition(not_before, expires_at, now)
            if upcoming is not None:
                transitions.append(upcoming)
        transitions += [r.until for r in document.revocations if r.until is not None]
        observed.grants = views
        key = (namespace, ps.name)
        upcoming_all = [t for t in transitions if t > now]
        if upcoming_all:  # flip Active / drop expired grants and revocations exactly on time
            self.queue.request_at(key, Aspect.POLICY, min(upcoming_all), slot="validity")

    async def _live_identities(
        self, key: Key, grants: list[RouteGrant], observed: _Observed
    ) -> LiveIdentities:
        """List the granted service accounts and their pods; retire what went away; the
        snapshot to publish (the last one, unchanged, when nothing changed)."""
        accounts = granted_accounts(grants)
        self._watch_accounts(key, accounts)
        started = self.clock()  # everything created before now is in the lists below
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
                uids.update({a: u for a, u in observed.accounts.items() if a in mine})
                pod_accounts.update({u: a for u, a in observed.pod_accounts.items() if a in mine})
                continue
            uids.update(account_uids(mine, sas))
            for pod in pods:
                uid, account = _meta(pod).get("uid"), pod_account(pod)
                if uid and account in mine:
                    pod_accounts[str(uid)] = account
        now = self.clock()
        found = Snapshot(uids, frozenset(pod_accounts), frozenset())
        retire_vanished(
            self._retired, observed.identities, found.identities(now), observed.pod_accounts, now
        )
        self._retired.prune(now)
        snapshot = Snapshot(uids, frozenset(pod_accounts), frozenset(self._retired.of(accounts)))
        published = observed.identities
        if (
            published is not None
            and same_content(published, snapshot)
            and started - published.observed_at < SNAPSHOT_REFRESH
        ):
            live = published  # same content, same time: the policy version does not move
        else:
            live = snapshot.identities(started - SNAPSHOT_CLOCK_SLACK)
        observed.identities, observed.accounts, observed.pod_accounts = live, uids, pod_accounts
        return live

    def _watch_accounts(self, key: Key, accounts: set[Account]) -> None:
        """Route events of `accounts` (and of their pods) to `key`, and no others."""
        for account, keys in list(self._account_watchers.items()):
            if account not in accounts:
                keys.discard(key)
                if not keys:
                    del self._account_watchers[account]
        for account in accounts:
            self._account_watchers[account].add(key)

    # -- owned objects ----------------------------------------------------------------------

    async def _apply_owned(self, ps: ProtectedService, observed: _Observed) -> None:
        manager = self.settings.field_manager
        backend = await self.client.get(SERVICES, ps.spec.backend.service, ps.namespace)
        observed.backend_found = backend is not None
        backend_port = _service_port(backend, ps.spec.backend.port) if backend else None
        problems = owned_problems(ps, backend, backend_port, observed.missing_issuers)
        manifests = [
            m.build_service_account(ps),
            m.build_role(ps),
            m.build_role_binding(ps),
            m.build_proxy_service(ps),
            m.build_pod_disruption_budget(ps),
        ]
        if observed.document is not None and observed.version is not None:
            manifests.append(m.build_policy_configmap(ps, observed.document, observed.version))
        if m.assertion_enabled(ps):
            manifests += await self._assertion_manifests(ps)
        await asyncio.gather(*(self.client.apply(x, field_manager=manager) for x in manifests))
        hpa = m.build_hpa(ps)
        if hpa is not None:
            await self.client.apply(hpa, field_manager=manager)
        else:
            await self.client.delete(HPAS, m.resource_name(ps), ps.namespace)
        await self._apply_isolation(ps, backend, backend_port, problems)
        await self._apply_deployment(ps, observed)
        observed.problems = problems

    async def _apply_deployment(self, ps: ProtectedService, observed: _Observed) -> None:
        deployment = m.build_proxy_deployment(
            ps,
            image=self.settings.proxy_image,
            image_pull_policy=self.settings.proxy_image_pull_policy,
            policy_version=observed.version or "",
        )
        observed.deployment = await self.client.apply(
            deployment, field_manager=self.settings.field_manager
        )
        observed.deployment_version = observed.version

    async def _apply_isolation(
        self,
        ps: ProtectedService,
        backend: JSON | None,
        backend_port: JSON | None,
        problems: list[Problem],
    ) -> None:
        name = m.isolation_policy_name(ps)
        if ps.spec.isolation.mode != "Enforce":
            await self.client.delete(NETWORKPOLICIES, name, ps.namespace)
            return
        if backend is None or backend_port is None:
            return  # keep whatever isolation exists: never open a path because a read failed
        selector = _spec(backend).get("selector") or {}
        target_port: int | str = backend_port.get("targetPort") or ps.spec.backend.port
        try:
            policy = m.build_isolation_network_policy(
                ps, selector, target_port, protocol=str(backend_port.get("protocol", "TCP"))
            )
        except ValueError as exc:
            problems.append(Problem(c.REASON_ERROR, str(exc)))
            return
        if policy is not None:
            await self.client.apply(policy, field_manager=self.settings.field_manager)

    async def _assertion_manifests(self, ps: ProtectedService) -> list[JSON]:
        """The assertion key Secret (generated once, then kept) and its public JWKS ConfigMap."""
        secret = await self.client.get(SECRETS, m.assertion_key_secret_name(ps), ps.namespace)
        pem: bytes | None = None
        encoded = ((secret or {}).get("data") or {}).get(m.ASSERTION_KEY_FILE)
        if encoded:
            pem = base64.b64decode(encoded)
            try:
                public = assertion_public_jwks(pem)
            except ValueError:
                pem = None  # unusable: replace it
        if pem is None:
            pem = new_assertion_key()
            public = assertion_public_jwks(pem)
        return [
            m.build_assertion_key_secret(ps, pem),
            m.build_assertion_jwks_configmap(ps, public),
        ]

    # -- replicas ---------------------------------------------------------------------------

    async def _observe_replicas(
        self, ps: ProtectedService, observed: _Observed, *, deployment_known: bool
    ) -> None:
        selector = f"{m.LABEL_PROTECTED_SERVICE}={ps.name}"
        leases, _ = await self.client.list(LEASES, ps.namespace, label_selector=selector)
        if not deployment_known:
            observed.deployment = await self.client.get(
                DEPLOYMENTS, m.resource_name(ps), ps.namespace
            )
        now = self.clock()
        observed.replicas = live_replicas(leases, now)
        observed.usage = read_reports(leases, now)
        expiry = next_replica_expiry(observed.replicas)
        key = (ps.namespace, ps.name)
        if expiry is not None:  # a replica that stops reporting sends no event: look again then
            self.queue.request_at(
                key, Aspect.ENFORCEMENT, expiry + _LEASE_EXPIRY_SLACK, slot="leases"
            )

    # -- bypass -----------------------------------------------------------------------------

    async def _observe_bypass(self, ps: ProtectedService, observed: _Observed) -> None:
        namespace = ps.namespace
        backend = await self.client.get(SERVICES, ps.spec.backend.service, namespace)
        observed.backend_found = backend is not None
        if backend is None:
            observed.bypass = None
            return
        served = await self._httproutes_are_served()
        results = await asyncio.gather(
            self.client.list(NETWORKPOLICIES, namespace),
            self.client.list(SERVICES, namespace),
            self.client.list(INGRESSES, namespace),
            self.client.list(PODS, namespace),
            self._list_or_empty(HTTPROUTES, namespace) if served else _empty(),
            self._list_or_empty(NAMESPACES, None),
        )
        policies, services, ingresses, pods, routes, namespaces = (r[0] for r in results)
        selector = _spec(backend).get("selector") or {}
        backend_pods = [
            p
            for p in pods
            if selector
            and selector_matches({"matchLabels": selector}, _meta(p).get("labels") or {})
        ]
        paths = find_bypass_paths(
            ps_namespace=namespace,
            backend_service=backend,
            backend_pods=backend_pods,
            proxy_pod_labels=m.proxy_labels(ps),
            isolation_policy_name=m.isolation_policy_name(ps),
            allow_from=m.allow_from_peers(ps),
            network_policies=policies,
            services=services,
            ingresses=ingresses,
            http_routes=routes,
            namespaces=namespaces,
            backend_port=ps.spec.backend.port,
        )
        before = set(observed.bypass or ())
        observed.bypass = paths
        if ps.spec.isolation.mode == "Off":
            return  # the user chose no isolation: report, but do not warn about each path
        for path in paths:
            if path not in before:
                await self.status.post_event(
                    _ref_body(ps),
                    "Warning",
                    "BypassFound",
                    f"direct path to the backend: {path.kind} {path.namespace}/{path.name}: "
                    f"{path.reason}",
                )

    async def _httproutes_are_served(self) -> bool:
        now = self.clock()
        if self._httproutes_served is None or now - self._httproutes_served[1] > 60:
            try:
                served = await self.client.resource_exists(
                    HTTPROUTES.group, HTTPROUTES.version, HTTPROUTES.plural
                )
            except KubeError:
                served = False
            self._httproutes_served = (served, now)
        return self._httproutes_served[0]

    async def _list_or_empty(
        self, ref: ResourceRef, namespace: str | None
    ) -> tuple[list[JSON], str]:
        try:
            return await self.client.list(ref, namespace)
        except KubeError as exc:
            if exc.status in (403, 404):
                self.log.warning("cannot list %s: %s", ref.plural, exc)
                return [], ""
            raise

    # -- status -----------------------------------------------------------------------------

    async def _write_service_status(
        self, ps: ProtectedService, body: JSON, observed: _Observed
    ) -> None:
        generation = ps.metadata.generation
        available = proxy_available(observed.deployment)
        enforced, ratio = policy_enforced(observed.replicas, observed.version)
        problems = list(observed.problems)
        if observed.policy_error:
            problems.append(Problem(c.REASON_ERROR, observed.policy_error))
        ready = service_ready(problems, available)
        blocked = direct_path_blocked(ps.spec.isolation.mode, observed.bypass)
        status: JSON = {
            "conditions": self.status.conditions(body, [ready, available, enforced, blocked]),
            "bypassPaths": [p.model_dump() for p in observed.bypass or ()],
            "enforcedReplicas": ratio,
            "endpoint": m.proxy_endpoint(ps),
        }
        if observed.version:
            status["policyVersion"] = observed.version
        if generation is not None:
            status["observedGeneration"] = generation
        await self.status.apply(PROTECTEDSERVICES, body, status)

    async def _write_invalid_service(self, body: JSON, exc: ValidationError) -> None:
        message = "; ".join(describe_validation_error(exc))
        ready = condition(c.READY, False, c.REASON_ERROR, f"invalid spec: {message}")
        status: JSON = {"conditions": self.status.conditions(body, [ready])}
        await self.status.apply(PROTECTEDSERVICES, body, status)

    async def _write_grant_statuses(self, ps: ProtectedService, observed: _Observed) -> None:
        now = self.clock()
        limit = asyncio.Semaphore(_STATUS_WRITE_CONCURRENCY)
        policy = ps.spec.grant_policy
        idle_after = (
            _seconds(policy.unused_after)
            if policy is not None and policy.unused_after is not None
            else self.settings.unused_after
        )
        wake: list[float] = []

        async def write(view: _GrantView) -> None:
            accepted = view.accepted["status"] == c.TRUE
            enforced, ratio = grant_enforced(
                view.key,
                view.compiled,
                accepted=accepted,
                replicas=observed.replicas,
                contents=observed.contents,
            )
            active = view.active or grant_active(*grant_window(view.body), now)
            extra: JSON = {"enforcedReplicas": ratio}
            if view.compiled is not None and observed.version:
                extra["policyVersion"] = observed.version
            subjects = view.subjects or condition(
                c.SUBJECTS_FOUND, c.UNKNOWN, c.REASON_NOT_ACCEPTED, "the grant is not accepted"
            )
            usage, unused = self._usage_status(view, observed.usage, idle_after, now, wake)
            extra["usage"] = usage
            desired = [view.accepted, active, enforced, subjects, unused]
            async with limit:
                await self.status.write_grant(view.body, desired, extra)

        await asyncio.gather(*(write(v) for v in observed.grants))
        if wake:  # a grant turns idle, or held-back usage is due: no event will say so
            key = (ps.namespace, ps.name)
            self.queue.request_at(key, Aspect.ENFORCEMENT, min(wake), slot="usage")

    def _usage_status(
        self,
        view: _GrantView,
        reports: Reports,
        idle_after: float,
        now: float,
        wake: list[float],
    ) -> tuple[JSON, JSON]:
        """`status.usage` and `Unused` for one grant. Usage is rewritten at most once per
        `usage_write_interval` unless it changed materially (first use, Unused flips, ...):
        steady traffic must not turn every Lease renewal into a status write."""
        previous = (view.body.get("status") or {}).get("usage")
        fresh = grant_usage(view.key, view.compiled, reports, previous, now)
        created = parse_optional(_meta(view.body).get("creationTimestamp"))
        unused, idle_at = grant_unused(
            fresh.get("lastUsed"), created, idle_after, complete=reports.complete, now=now
        )
        if idle_at is not None:
            wake.append(idle_at + _LEASE_EXPIRY_SLACK)
        if fresh == previous:
            return fresh, unused
        written = self._usage_written.get(view.key)
        due = written is None or now - written >= self.settings.usage_write_interval
        conditions = (view.body.get("status") or {}).get("conditions")
        before = c.get_condition(conditions, c.UNUSED)
        flips = before is None or before.get("status") != unused["status"]
        if previous is None or due or flips or usage_changed_materially(previous, fresh):
            self._usage_written[view.key] = now
            return fresh, unused
        assert written is not None  # (else due)
        wake.append(written + self.settings.usage_write_interval)
        return dict(previous), unused

    async def _judge_orphan_grants(self, namespace: str, name: str) -> None:
        """Grants whose target does not exist: Accepted=False TargetNotFound."""
        grants, _ = await self.client.list(ROUTEGRANTS, namespace)
        now = self.clock()
        for body in grants:
            if grant_target(body) != name:
                continue
            desired, extra = orphan_grant_status(body, namespace, name, now)
            await self.status.write_grant(body, desired, extra)

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
        generation = _meta(body).get("generation")
        status: JSON = {"conditions": self.status.conditions(body, [verdict])}
        if generation is not None:
            status["observedGeneration"] = generation
        await self.status.apply(REVOCATIONS, dict(body), status)


def _parse_all(model: Any, bodies: Iterable[JSON]) -> list[Any]:
    parsed = []
    for body in bodies:
        try:
            parsed.append(model.model_validate(body))
        except ValidationError:
            continue  # an invalid object counts as absent; its own status says why
    return parsed


def _service_port(service: JSON, port: int) -> JSON | None:
    for entry in _spec(service).get("ports") or []:
        if entry.get("port") == port:
            found: JSON = entry
            return found
    return None


def _ref_body(ps: ProtectedService) -> JSON:
    return {
        "apiVersion": ps.api_version,
        "kind": ps.kind,
        "metadata": {"name": ps.name, "namespace": ps.namespace, "uid": ps.metadata.uid},
    }


def _seconds(duration: str) -> float:
    return parse_duration(duration).total_seconds()


async def _empty() -> tuple[list[JSON], str]:
    return [], ""


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
