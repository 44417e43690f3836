"""kopf handlers: thin, each delegating to `Controller` (reconcile.py).

`build_registry(settings)` returns a fresh `kopf.OperatorRegistry` with every
handler registered on it (never kopf's global default registry), so tests and
`run.py` can embed as many independent controllers as they like.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from nhigate.controller import manifests as m
from nhigate.controller.bypass_observer import BYPASS_INPUTS
from nhigate.controller.reconcile import Controller
from nhigate.controller.settings import ControllerSettings
from nhigate.k8s import (
    CONFIGMAPS,
    DEPLOYMENTS,
    IDENTITYISSUERS,
    LEASES,
    NAMESPACES,
    PODS,
    PROTECTEDSERVICES,
    REVOCATIONS,
    ROUTEGRANTS,
    SERVICEACCOUNTS,
    KubeClient,
    ResourceRef,
)

log = logging.getLogger("nhigate.controller")


def _selector(ref: ResourceRef) -> tuple[str, ...]:
    """kopf's positional resource selector for a ref (core group: `("v1", plural)`)."""
    if ref.group:
        return (ref.group, ref.version, ref.plural)
    return (ref.version, ref.plural)


def _raw(event: Mapping[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = event.get("object") or {}
    return obj


class ControllerHolder:
    """The running `Controller`, created at operator startup (it needs the event loop)."""

    def __init__(self) -> None:
        self._controller: Controller | None = None

    @property
    def controller(self) -> Controller:
        """The controller; RuntimeError before startup."""
        if self._controller is None:
            raise RuntimeError("the controller has not started")
        return self._controller

    @property
    def running(self) -> Controller | None:
        """The controller, or None when not started (or stopped)."""
        return self._controller

    def set(self, controller: Controller | None) -> None:
        """Install (or clear) the running controller."""
        self._controller = controller


def build_registry(
    settings: ControllerSettings, holder: ControllerHolder | None = None
) -> kopf.OperatorRegistry:
    """A fresh registry with all nhigate handlers bound to `settings`."""
    registry = kopf.OperatorRegistry()
    holder = holder or ControllerHolder()
    ours = settings

    def ctl() -> Controller:
        return holder.controller

    # -- lifecycle -----------------------------------------------------------------------

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, ours)
        client = await KubeClient.connect(ours.kubeconfig)
        holder.set(Controller(client, ours, logger=log))

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await connection_info(ours.kubeconfig)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        controller = holder.running
        holder.set(None)
        if controller is not None:
            await controller.close()
            await controller.client.close()

    # -- ProtectedService ----------------------------------------------------------------

    @kopf.on.resume(*_selector(PROTECTEDSERVICES), registry=registry)
    @kopf.on.create(*_selector(PROTECTEDSERVICES), registry=registry)
    @kopf.on.update(*_selector(PROTECTEDSERVICES), registry=registry)
    async def reconcile_service(namespace: str | None, name: str, **_: Any) -> None:
        # Never raises for a failed sync: the work queue retries it (one retry mechanism).
        await ctl().reconcile_service(str(namespace), name)

    # No kopf timers: kopf puts a finalizer on objects with timers, and a finalizer would
    # block deletion while the controller is down. Drift correction and issuer refresh are
    # timers of the controller's own work queue instead.

    @kopf.on.event(*_selector(PROTECTEDSERVICES), registry=registry)
    async def service_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().service_event(str(event.get("type")), _raw(event))

    # -- RouteGrant, Revocation ----------------------------------------------------------

    @kopf.on.event(*_selector(ROUTEGRANTS), registry=registry)
    async def grant_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().grant_event(str(event.get("type")), _raw(event))

    @kopf.on.event(*_selector(REVOCATIONS), registry=registry)
    async def revocation_event(event: Mapping[str, Any], **_: Any) -> None:
        await ctl().revocation_event(str(event.get("type")), _raw(event))

    # -- IdentityIssuer ------------------------------------------------------------------

    @kopf.on.resume(*_selector(IDENTITYISSUERS), registry=registry)
    @kopf.on.create(*_selector(IDENTITYISSUERS), registry=registry)
    @kopf.on.update(*_selector(IDENTITYISSUERS), registry=registry)
    async def reconcile_issuer(namespace: str | None, name: str, **_: Any) -> None:
        await ctl().reconcile_issuer(str(namespace), name)  # then refreshed on its own timer

    @kopf.on.event(*_selector(IDENTITYISSUERS), registry=registry)
    async def issuer_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().issuer_event(str(event.get("type")), _raw(event))

    # -- what the proxies report, and what we own ----------------------------------------

    @kopf.on.event(
        *_selector(LEASES), labels={m.LABEL_PROTECTED_SERVICE: kopf.PRESENT}, registry=registry
    )
    async def lease_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().lease_event(_raw(event))

    owned: dict[str, Any] = {
        m.LABEL_MANAGED_BY: m.MANAGED_BY,
        m.LABEL_PROTECTED_SERVICE: kopf.PRESENT,
    }

    @kopf.on.event(*_selector(DEPLOYMENTS), labels=owned, registry=registry)
    @kopf.on.event(*_selector(CONFIGMAPS), labels=owned, registry=registry)
    async def owned_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().owned_event(str(event.get("type")), _raw(event))

    # -- bypass detection inputs ---------------------------------------------------------

    async def network_event(namespace: str | None, **_: Any) -> None:
        ctl().network_event(namespace)

    for ref in BYPASS_INPUTS:  # the kinds the bypass analysis reads, listed once
        kopf.on.event(*_selector(ref), registry=registry)(network_event)

    # -- live identities behind service-account subjects -----------------------------------

    @kopf.on.event(*_selector(SERVICEACCOUNTS), registry=registry)
    async def service_account_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().service_account_event(str(event.get("type")), _raw(event))

    @kopf.on.event(*_selector(PODS), registry=registry)
    async def pod_event(event: Mapping[str, Any], **_: Any) -> None:
        ctl().pod_event(str(event.get("type")), _raw(event))

    @kopf.on.event(*_selector(NAMESPACES), registry=registry)
    async def namespace_event(**_: Any) -> None:
        ctl().network_event(None)

    return registry


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: ControllerSettings) -> None:
    """kopf's own behaviour: annotations under our prefix, events, peering, no finalizers."""
    prefix = settings.annotation_prefix
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{prefix}/kopf-finalizer"
    kopf_settings.posting.enabled = True
    kopf_settings.posting.level = logging.WARNING  # handler failures, not every success
    kopf_settings.peering.standalone = not settings.peering
    kopf_settings.peering.name = settings.peering_name
    kopf_settings.peering.priority = settings.peering_priority
    kopf_settings.peering.clusterwide = not settings.namespaces
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.networking.request_timeout = 30


async def connection_info(kubeconfig: str | None) -> kopf.ConnectionInfo:
    """kopf credentials from the same source as `KubeClient.connect(kubeconfig)`."""
    client = await KubeClient.connect(kubeconfig)
    try:
        cfg = client.configuration
        token = (cfg.api_key or {}).get("BearerToken")
        if token is None and cfg.refresh_api_key_hook is not None:
            await cfg.refresh_api_key_hook(cfg)
            token = (cfg.api_key or {}).get("BearerToken")
        scheme, value = None, None
        if token:
            scheme, _, value = str(token).partition(" ")
            if not value:
                scheme, value = "Bearer", scheme
        return kopf.ConnectionInfo(
            server=str(cfg.host),
            ca_path=cfg.ssl_ca_cert or None,
            insecure=not cfg.verify_ssl,
            scheme=scheme,
            token=value,
            certificate_path=cfg.cert_file or None,
            private_key_path=cfg.key_file or None,
            username=cfg.username or None,
            password=cfg.password or None,
        )
    finally:
        await client.close()
