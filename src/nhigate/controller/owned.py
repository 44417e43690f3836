"""The objects a ProtectedService owns: applied (server-side) by `OwnedObjects`, with the
problems found on the way (`owned_problems`, `plan_isolation`: pure).

Owned are the proxy's ServiceAccount, Role, RoleBinding, Service, PodDisruptionBudget,
HorizontalPodAutoscaler, policy ConfigMap, Deployment, the assertion key Secret and JWKS
ConfigMap (when identity assertion is on) and the isolation NetworkPolicy (when enforced).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nhigate.api import conditions as c
from nhigate.api.models import ProtectedService
from nhigate.controller import manifests as m
from nhigate.controller.jwks import assertion_public_jwks, new_assertion_key
from nhigate.controller.protocols import ProtocolResolution, resolve_backend_protocol
from nhigate.controller.settings import ControllerSettings
from nhigate.controller.status import Problem, owned_problems
from nhigate.k8s import DEPLOYMENTS, HPAS, NETWORKPOLICIES, SECRETS, SERVICES, KubeClient

JSON = dict[str, Any]


@dataclass(frozen=True)
class IsolationPlan:
    """What to do about a service's isolation NetworkPolicy (`plan_isolation`)."""

    delete: bool = False
    """Isolation is not enforced: delete the policy."""
    manifest: JSON | None = None
    """The policy to apply (None with `delete` False: keep whatever exists)."""
    problem: Problem | None = None
    """Why no policy can be built (the existing one is kept)."""


def plan_isolation(
    ps: ProtectedService, backend: Mapping[str, Any] | None, backend_port: Mapping[str, Any] | None
) -> IsolationPlan:
    """The isolation NetworkPolicy of `ps` given its backend Service and port as read (None:
    not found). Fails closed: an unread or unusable backend keeps the policy that exists."""
    if ps.spec.isolation.mode != "Enforce":
        return IsolationPlan(delete=True)
    if backend is None or backend_port is None:
        return IsolationPlan()  # never open a path because a read failed
    selector = (backend.get("spec") or {}).get("selector") or {}
    target_port: int | str = backend_port.get("targetPort") or ps.spec.backend.port
    try:
        policy = m.build_isolation_network_policy(
            ps, selector, target_port, protocol=str(backend_port.get("protocol", "TCP"))
        )
    except ValueError as exc:
        return IsolationPlan(problem=Problem(c.REASON_ERROR, str(exc)))
    return IsolationPlan(manifest=policy)


@dataclass(frozen=True)
class BackendView:
    """What the owned objects are built from of the backend Service: its selector and the
    entry of `spec.backend.port` (None: not found). A change means re-applying them."""

    found: bool
    selector: JSON | None
    port: JSON | None

    @classmethod
    def of(cls, ps: ProtectedService, backend: Mapping[str, Any] | None) -> BackendView:
        """The view of `backend` (the Service as read, None: absent) for `ps`."""
        if backend is None:
            return cls(False, None, None)
        selector = (backend.get("spec") or {}).get("selector")
        return cls(
            True, dict(selector) if selector else None, service_port(backend, ps.spec.backend.port)
        )


@dataclass(frozen=True)
class Applied:
    """What applying a ProtectedService's owned objects found."""

    deployment: JSON | None
    """The proxy Deployment as applied (or as it exists, when it was left alone; None: none)."""
    problems: list[Problem]
    """What keeps the service from being Ready."""
    protocol: ProtocolResolution
    """The backend protocol the proxy was rendered with (`protocol` None: left alone)."""
    backend: BackendView
    """The backend Service as read."""


def service_port(service: Mapping[str, Any], port: int) -> JSON | None:
    """The entry of `service`'s `spec.ports` for `port` (None: it has none)."""
    for entry in (service.get("spec") or {}).get("ports") or []:
        if entry.get("port") == port:
            found: JSON = entry
            return found
    return None


class OwnedObjects:
    """Server-side apply of what ProtectedServices own, as one field manager."""

    def __init__(self, client: KubeClient, settings: ControllerSettings) -> None:
        self.client = client
        self.settings = settings

    async def apply(
        self,
        ps: ProtectedService,
        *,
        policy: tuple[bytes, str] | None,
        policy_version: str | None,
        missing_issuers: Sequence[str],
    ) -> Applied:
        """Apply everything `ps` owns, the policy ConfigMap with `policy` (packed document,
        version) when one was compiled.

        When the backend's protocol cannot be resolved (the spec and the Service's
        `appProtocol` disagree), the proxy Deployment and Service are left as they are: a
        proxy speaking the wrong protocol would fail every request (fail closed, as a
        broken isolation policy is kept rather than opened)."""
        manager = self.settings.field_manager
        backend = await self.client.get(SERVICES, ps.spec.backend.service, ps.namespace)
        view = BackendView.of(ps, backend)
        protocol = resolve_backend_protocol(ps, view.port)
        problems = owned_problems(ps, backend, view.port, missing_issuers, protocol)
        manifests = [m.build_service_account(ps), m.build_role(ps), m.build_role_binding(ps)]
        if protocol.protocol is not None:
            manifests.append(m.build_proxy_service(ps, protocol.protocol))
        manifests.append(m.build_pod_disruption_budget(ps))
        if policy is not None:
            manifests.append(m.build_policy_configmap(ps, *policy))
        if m.assertion_enabled(ps):
            manifests += await self._assertion_manifests(ps)
        await asyncio.gather(*(self.client.apply(x, field_manager=manager) for x in manifests))
        hpa = m.build_hpa(ps)
        if hpa is not None:
            await self.client.apply(hpa, field_manager=manager)
        else:
            await self.client.delete(HPAS, m.resource_name(ps), ps.namespace)
        isolation = plan_isolation(ps, backend, view.port)
        if isolation.delete:
            await self.client.delete(NETWORKPOLICIES, m.isolation_policy_name(ps), ps.namespace)
        elif isolation.manifest is not None:
            await self.client.apply(isolation.manifest, field_manager=manager)
        if isolation.problem is not None:
            problems.append(isolation.problem)
        deployment = await self.apply_deployment(ps, policy_version, protocol)
        return Applied(deployment, problems, protocol, view)

    async def apply_deployment(
        self, ps: ProtectedService, policy_version: str | None, protocol: ProtocolResolution
    ) -> JSON | None:
        """Apply the proxy Deployment (annotated with `policy_version`) for the backend
        `protocol`; as applied. An unresolved protocol leaves it as it is (as read; None:
        there is none)."""
        if protocol.protocol is None:
            return await self.client.get(DEPLOYMENTS, m.resource_name(ps), ps.namespace)
        deployment = m.build_proxy_deployment(
            ps,
            image=self.settings.proxy_image,
            image_pull_policy=self.settings.proxy_image_pull_policy,
            policy_version=policy_version or "",
            protocol=protocol.protocol,
        )
        return await self.client.apply(deployment, field_manager=self.settings.field_manager)

    async def backend_view(self, ps: ProtectedService) -> BackendView:
        """The backend Service of `ps` as it is now."""
        backend = await self.client.get(SERVICES, ps.spec.backend.service, ps.namespace)
        return BackendView.of(ps, backend)

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
