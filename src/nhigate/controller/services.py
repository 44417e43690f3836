"""ProtectedService sync: everything about one ProtectedService X, recomputed by one
coalescing sync per X (`ServiceSync`, owned by the `Controller`).

A sync reads the cluster, compiles X's policy and applies it first (revocation latency
is the time from a watch event to the ConfigMap write, plus the proxies' own watch),
server-side-applies X's owned objects where they differ, observes the proxy replicas'
reports and the direct paths to the backend, and writes the status of X and of the
RouteGrants targeting X from what it observed. What the status says is decided by pure
functions (`status.py`, `grants.py`, `usage.py`); this module does the I/O around them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from nhigate.api import conditions as c
from nhigate.api.compile import build_policy_document, missing_issuers
from nhigate.api.durations import parse_duration
from nhigate.api.models import (
    BypassPath,
    GrantUsage,
    IdentityIssuer,
    ProtectedService,
    Revocation,
    RouteGrant,
    RouteGrantStatus,
)
from nhigate.api.resources import describe_validation_error
from nhigate.controller import manifests as m
from nhigate.controller.bypass_observer import BypassObserver
from nhigate.controller.grants import grant_target, grant_window, judge_grant, orphan_grant_status
from nhigate.controller.identities import (
    subjects_found,
)
from nhigate.controller.identity_tracker import IdentityTracker, PublishedIdentities
from nhigate.controller.issuers import IssuerSync
from nhigate.controller.owned import BackendView, OwnedObjects
from nhigate.controller.protocols import ProtocolResolution
from nhigate.controller.settings import ControllerSettings
from nhigate.controller.status import (
    Problem,
    ReplicaReport,
    condition,
    grant_active,
    grant_enforced,
    invalid_service_status,
    live_replicas,
    next_replica_expiry,
    next_transition,
    service_status,
)
from nhigate.controller.status_writer import StatusWriter, service_transitions
from nhigate.controller.usage import (
    Reports,
    grant_unused,
    grant_usage,
    read_reports,
    usage_changed_materially,
)
from nhigate.controller.workqueue import Aspect, Key, SyncFn, WorkQueue
from nhigate.k8s import (
    DEPLOYMENTS,
    IDENTITYISSUERS,
    LEASES,
    PROTECTEDSERVICES,
    REVOCATIONS,
    ROUTEGRANTS,
    KubeClient,
)
from nhigate.policy import Grant, PolicyDocument, pack_document
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
    protocol: ProtocolResolution | None = None
    """The backend protocol the owned objects were last applied for."""
    backend: BackendView | None = None
    """The backend Service as the owned objects were last applied from."""
    replicas: list[ReplicaReport] = field(default_factory=list)
    bypass: list[BypassPath] | None = None
    contents: OrderedDict[str, dict[str, Grant]] = field(default_factory=OrderedDict)
    """Policy version -> the grants (by `namespace/name`) it contains, newest last."""
    identities: PublishedIdentities = field(default_factory=PublishedIdentities)
    """The live service accounts and pods last listed, and last published in the policy."""
    usage: Reports = field(default_factory=lambda: Reports((), True))
    """The replicas' usage reports, from every Lease of the service (live or stale)."""


class ServiceSync:
    """The ProtectedServices of one controller process: their sync queue and what each
    sync last observed."""

    def __init__(
        self,
        client: KubeClient,
        settings: ControllerSettings,
        *,
        status: StatusWriter,
        issuers: IssuerSync,
        work_queue: Callable[[SyncFn], WorkQueue],
        logger: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        """`work_queue(sync)` makes the services' queue (the controller's backoff and clock)."""
        self.client = client
        self.settings = settings
        self.status = status
        self.issuers = issuers
        self.log = logger
        self.clock = clock
        self.queue = work_queue(self._sync)
        self.owned = OwnedObjects(client, settings)
        self.bypass = BypassObserver(client, status=status, logger=logger, clock=clock)
        self.names: defaultdict[str, set[str]] = defaultdict(set)
        """Namespace -> the ProtectedServices known to exist in it."""
        self.grant_targets: dict[tuple[str, str], str] = {}
        """RouteGrant (namespace, name) -> the service it last targeted."""
        self._observed: dict[Key, _Observed] = {}
        self._usage_written: dict[str, float] = {}
        """Grant `namespace/name` -> when this process last wrote its `status.usage`."""
        self.identities = IdentityTracker(client, request=self.request, logger=logger, clock=clock)

    async def close(self) -> None:
        """Stop the worker and timers."""
        await self.queue.close()

    def request(self, key: Key, aspects: Aspect) -> None:
        """Sync `aspects` of service `key` soon (a failure is logged and retried by the queue)."""
        self.queue.request(key, aspects).add_done_callback(retrieve)

    def request_namespace(self, namespace: str, aspects: Aspect) -> None:
        """Sync `aspects` of every known service in `namespace`."""
        for name in list(self.names.get(namespace, ())):
            self.request((namespace, name), aspects)

    def serves_own_policy(self, key: Key, served: str | None) -> bool:
        """Whether policy version `served` (read from the ConfigMap) is the one last published
        for `key` (True when nothing was published yet: nothing to restore)."""
        observed = self._observed.get(key)
        return observed is None or served == observed.version

    # -- the sync -----------------------------------------------------------------------------

    async def _sync(self, key: Key, aspects: Aspect) -> None:
        namespace, name = key
        body = await self.client.get(PROTECTEDSERVICES, name, namespace)
        if body is None or _meta(body).get("deletionTimestamp"):
            self._observed.pop(key, None)
            self.queue.forget(key)
            self.identities.watch(key, set())
            await self._judge_orphan_grants(namespace, name)
            return
        self.names[namespace].add(name)
        if key not in self._observed:
            aspects = Aspect.ALL  # first sync in this process: observe everything
        observed = self._observed.setdefault(key, _Observed())
        try:
            ps = ProtectedService.model_validate(body)
        except ValidationError as exc:
            message = "; ".join(describe_validation_error(exc))
            status = invalid_service_status(message)
            await self.status.apply(PROTECTEDSERVICES, body, status.fields, status.desired)
            return
        previous_version = observed.version
        if aspects & Aspect.POLICY:
            await self._compile_policy(ps, observed)
        # a change of the backend Service (its selector, port, appProtocol) arrives as a
        # bypass input only: the owned objects built from it must follow it too
        if (
            aspects & Aspect.BYPASS
            and not aspects & Aspect.INFRA
            and await self.owned.backend_view(ps) != observed.backend
        ):
            aspects |= Aspect.INFRA
        if aspects & Aspect.INFRA:
            published = None
            if observed.document is not None and observed.version is not None:
                published = (observed.document, observed.version)
            applied = await self.owned.apply(
                ps,
                policy=published,
                policy_version=observed.version,
                missing_issuers=observed.missing_issuers,
            )
            observed.deployment, observed.problems = applied.deployment, applied.problems
            observed.protocol, observed.backend = applied.protocol, applied.backend
        elif (
            observed.version != previous_version
            and observed.deployment is not None
            and observed.protocol is not None
            and observed.protocol.protocol is not None
        ):
            # keeps the Deployment's policy-version annotation true
            observed.deployment = await self.owned.apply_deployment(
                ps, observed.version, observed.protocol
            )
        if aspects & (Aspect.ENFORCEMENT | Aspect.POLICY | Aspect.INFRA):
            await self._observe_replicas(
                ps, observed, deployment_known=bool(aspects & Aspect.INFRA)
            )
        if aspects & (Aspect.BYPASS | Aspect.INFRA):
            observed.bypass = await self.bypass.observe(ps, observed.bypass)
        await self._write_service_status(ps, body, observed)
        await self._write_grant_statuses(ps, observed)
        if aspects & Aspect.INFRA:  # level-based drift correction, without a kopf timer
            when = self.clock() + self.settings.drift_interval
            self.queue.request_at(key, Aspect.ALL, when, slot="drift")

    # -- policy -------------------------------------------------------------------------------

    async def _compile_policy(self, ps: ProtectedService, observed: _Observed) -> None:
        now = self.clock()
        (issuer_bodies, _), (grant_bodies, _), (revocation_bodies, _) = await asyncio.gather(
            self.client.list(IDENTITYISSUERS, ps.namespace),
            self.client.list(ROUTEGRANTS, ps.namespace),
            self.client.list(REVOCATIONS, ps.namespace),
        )
        issuers = _parse_all(IdentityIssuer, issuer_bodies)
        revocations = _parse_all(Revocation, revocation_bodies)
        views = self._judge_grants(ps, grant_bodies, issuers, now)
        accepted = [v.grant for v in views if v.grant is not None]
        observed.identities = await self.identities.publish(
            (ps.namespace, ps.name), accepted, observed.identities
        )
        identities = observed.identities.live
        for view in views:
            if view.grant is not None:
                view.subjects = subjects_found(view.grant, observed.identities.accounts)
        jwks = await self.issuers.kubernetes_keys(ps, issuers)
        observed.missing_issuers = missing_issuers(ps, issuers)
        moment = datetime.fromtimestamp(now, tz=UTC)

        def publishable(grants: list[RouteGrant]) -> tuple[PolicyDocument, bytes, JSON]:
            """The policy document with `grants`, packed, and its ConfigMap (ValueError when
            it cannot be built or is too large even packed)."""
            document = build_policy_document(
                ps, issuers, grants, revocations, now=moment, issuer_jwks=jwks,
                identities=identities,
            )  # fmt: skip
            data = pack_document(document)
            return document, data, m.build_policy_configmap(ps, data, document.version)

        published = await self._publish(ps, observed, publishable, accepted)
        observed.grants = views
        if published is not None:
            self._judge_activity(ps, views, published, now)

    def _judge_grants(
        self,
        ps: ProtectedService,
        grant_bodies: Iterable[JSON],
        issuers: list[IdentityIssuer],
        now: float,
    ) -> list[_GrantView]:
        """The grants targeting `ps`, each with its `Accepted` verdict."""
        views: list[_GrantView] = []
        for body in grant_bodies:
            if grant_target(body) != ps.name:
                continue
            self.grant_targets[(ps.namespace, str(_meta(body).get("name")))] = ps.name
            grant, verdict = judge_grant(body, ps, issuers, now)
            views.append(_GrantView(body=body, accepted=verdict, grant=grant))
        return views

    async def _publish(
        self,
        ps: ProtectedService,
        observed: _Observed,
        publishable: Callable[[list[RouteGrant]], tuple[PolicyDocument, bytes, JSON]],
        accepted: list[RouteGrant],
    ) -> PolicyDocument | None:
        """Apply the policy with the `accepted` grants, or (it cannot be built) the one with no
        grants: the one publish path, failing closed. None when not even that can be built."""
        try:
            document, data, manifest = publishable(accepted)
            observed.policy_error = None
        except ValueError as exc:  # e.g. too large even packed
            # Fail closed: keeping the last good policy would keep grants deleted since then
            # alive, so publish one with no grants (issuers and revocations kept) instead.
            observed.policy_error = (
                f"the policy cannot be compiled ({exc}); every request is denied until it can"
            )
            self.log.error("%s/%s: %s", ps.namespace, ps.name, observed.policy_error)
            try:
                document, data, manifest = publishable([])
            except ValueError as deny_all_exc:
                self.log.error(
                    "%s/%s: not even a deny-all policy can be published: %s",
                    ps.namespace,
                    ps.name,
                    deny_all_exc,
                )
                return None
        if document.version != observed.version:
            await self.client.apply(manifest, field_manager=self.settings.field_manager)
            self.log.info("%s/%s: policy %s applied", ps.namespace, ps.name, document.version)
        observed.version, observed.document = document.version, data
        observed.contents[document.version] = {g.name: g for g in document.grants}
        observed.contents.move_to_end(document.version)
        while len(observed.contents) > _VERSIONS_KEPT:
            observed.contents.popitem(last=False)
        return document

    def _judge_activity(
        self, ps: ProtectedService, views: list[_GrantView], document: PolicyDocument, now: float
    ) -> None:
        """Each grant's `Active` and its compiled form in `document`; a sync is scheduled for
        the next moment a grant or revocation starts or ends."""
        in_policy = {g.name: g for g in document.grants}
        transitions: list[float] = []
        for view in views:
            not_before, expires_at = grant_window(view.body)
            view.active = grant_active(not_before, expires_at, now)
            view.compiled = in_policy.get(view.key)
            upcoming = next_transition(not_before, expires_at, now)
            if upcoming is not None:
                transitions.append(upcoming)
        transitions += [r.until for r in document.revocations if r.until is not None]
        upcoming_all = [t for t in transitions if t > now]
        if upcoming_all:  # flip Active / drop expired grants and revocations exactly on time
            key = (ps.namespace, ps.name)
            self.queue.request_at(key, Aspect.POLICY, min(upcoming_all), slot="validity")

    # -- replicas -----------------------------------------------------------------------------

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

    # -- status -------------------------------------------------------------------------------

    async def _write_service_status(
        self, ps: ProtectedService, body: JSON, observed: _Observed
    ) -> None:
        status = service_status(
            ps,
            deployment=observed.deployment,
            replicas=observed.replicas,
            version=observed.version,
            problems=observed.problems,
            policy_error=observed.policy_error,
            bypass=observed.bypass,
            endpoint=m.proxy_endpoint(ps),
            protocol=observed.protocol,
        )
        previous = (body.get("status") or {}).get("conditions") or ()
        before = {str(x.get("type")): x for x in previous}
        if not await self.status.apply(PROTECTEDSERVICES, body, status.fields, status.desired):
            return
        after = {d["type"]: d for d in status.desired}
        for type_, reason, message in service_transitions(before, after):
            await self.status.post_event(body, type_, reason, message)

    async def _write_grant_statuses(self, ps: ProtectedService, observed: _Observed) -> None:
        now = self.clock()
        limit = asyncio.Semaphore(_STATUS_WRITE_CONCURRENCY)
        policy = ps.spec.grant_policy
        idle_after = (
            parse_duration(policy.unused_after).total_seconds()
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
            subjects = view.subjects or condition(
                c.SUBJECTS_FOUND, c.UNKNOWN, c.REASON_NOT_ACCEPTED, "the grant is not accepted"
            )
            usage, unused = self._usage_status(view, observed.usage, idle_after, now, wake)
            fields = RouteGrantStatus(
                enforced_replicas=ratio,
                policy_version=observed.version if view.compiled is not None else None,
                usage=GrantUsage.model_validate(usage),
            )
            desired = [view.accepted, active, enforced, subjects, unused]
            async with limit:
                await self.status.write_grant(view.body, desired, fields)

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
            desired, fields = orphan_grant_status(body, namespace, name, now)
            await self.status.write_grant(body, desired, fields)


def _parse_all(model: Any, bodies: Iterable[JSON]) -> list[Any]:
    parsed = []
    for body in bodies:
        try:
            parsed.append(model.model_validate(body))
        except ValidationError:
            continue  # an invalid object counts as absent; its own status says why
    return parsed


def retrieve(future: asyncio.Future[None]) -> None:
    """Done callback of a fire-and-forget request: its failure was logged by the queue."""
    if not future.cancelled():
        future.exception()
