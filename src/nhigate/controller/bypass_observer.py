"""Watching for direct paths to a backend that skip the proxy (`BypassObserver`): lists
what the pure analysis (`bypass.find_bypass_paths`) reads and warns about new paths."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nhigate.api.models import BypassPath, ProtectedService
from nhigate.controller import manifests as m
from nhigate.controller.bypass import find_bypass_paths
from nhigate.controller.netpol import selector_matches
from nhigate.controller.status_writer import StatusWriter
from nhigate.k8s import (
    HTTPROUTES,
    INGRESSES,
    NAMESPACES,
    NETWORKPOLICIES,
    PODS,
    SERVICES,
    KubeClient,
    KubeError,
    ResourceRef,
)

JSON = dict[str, Any]

BYPASS_INPUTS: tuple[ResourceRef, ...] = (NETWORKPOLICIES, SERVICES, INGRESSES, HTTPROUTES, PODS)
"""The namespaced kinds the bypass analysis reads; a change to any re-runs it (with
Namespaces, whose labels namespaceSelectors match). The one list: handlers.py watches these."""

_HTTPROUTES_RECHECK = 60.0
"""Seconds between checks whether the API server serves HTTPRoutes at all."""


class BypassObserver:
    """Bypass analysis of one controller process (it remembers whether HTTPRoutes exist)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        status: StatusWriter,
        logger: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        self.client = client
        self.status = status
        self.log = logger
        self.clock = clock
        self._httproutes_served: tuple[bool, float] | None = None

    async def observe(
        self, ps: ProtectedService, before: Iterable[BypassPath] | None
    ) -> list[BypassPath] | None:
        """The direct paths to the backend of `ps` (None: its backend Service does not exist,
        nothing to analyse). A Warning Event is posted for each path not in `before`, unless
        isolation is Off."""
        namespace = ps.namespace
        backend = await self.client.get(SERVICES, ps.spec.backend.service, namespace)
        if backend is None:
            return None
        listed = await self._bypass_inputs(namespace)
        selector = (backend.get("spec") or {}).get("selector") or {}
        backend_pods = [
            p
            for p in listed[PODS]
            if selector and selector_matches({"matchLabels": selector}, _labels(p))
        ]
        paths = find_bypass_paths(
            ps_namespace=namespace,
            backend_service=backend,
            backend_pods=backend_pods,
            proxy_pod_labels=m.proxy_labels(ps),
            isolation_policy_name=m.isolation_policy_name(ps),
            allow_from=m.allow_from_peers(ps),
            network_policies=listed[NETWORKPOLICIES],
            services=listed[SERVICES],
            ingresses=listed[INGRESSES],
            http_routes=listed[HTTPROUTES],
            namespaces=listed[NAMESPACES],
            backend_port=ps.spec.backend.port,
        )
        if ps.spec.isolation.mode == "Off":
            return paths  # the user chose no isolation: report, but do not warn about each path
        known = set(before or ())
        for path in paths:
            if path not in known:
                await self.status.post_event(
                    _ref_body(ps),
                    "Warning",
                    "BypassFound",
                    f"direct path to the backend: {path.kind} {path.namespace}/{path.name}: "
                    f"{path.reason}",
                )
        return paths

    async def _bypass_inputs(self, namespace: str) -> dict[ResourceRef, list[JSON]]:
        """Each of `BYPASS_INPUTS` listed in `namespace`, and every Namespace. HTTPRoutes and
        Namespaces are optional (not served, or not readable): empty then."""
        served = await self._httproutes_are_served()

        async def listed(ref: ResourceRef) -> list[JSON]:
            if ref == HTTPROUTES:
                return await self._list_or_empty(ref, namespace) if served else []
            return (await self.client.list(ref, namespace))[0]

        refs = [*BYPASS_INPUTS, NAMESPACES]
        results = await asyncio.gather(
            *(listed(r) for r in BYPASS_INPUTS), self._list_or_empty(NAMESPACES, None)
        )
        return dict(zip(refs, results, strict=True))

    async def _httproutes_are_served(self) -> bool:
        now = self.clock()
        if (
            self._httproutes_served is None
            or now - self._httproutes_served[1] > _HTTPROUTES_RECHECK
        ):
            try:
                served = await self.client.resource_exists(
                    HTTPROUTES.group, HTTPROUTES.version, HTTPROUTES.plural
                )
            except KubeError:
                served = False
            self._httproutes_served = (served, now)
        return self._httproutes_served[0]

    async def _list_or_empty(self, ref: ResourceRef, namespace: str | None) -> list[JSON]:
        try:
            return (await self.client.list(ref, namespace))[0]
        except KubeError as exc:
            if exc.status in (403, 404):
                self.log.warning("cannot list %s: %s", ref.plural, exc)
                return []
            raise


def _labels(obj: JSON) -> JSON:
    labels: JSON = (obj.get("metadata") or {}).get("labels") or {}
    return labels


def _ref_body(ps: ProtectedService) -> JSON:
    return {
        "apiVersion": ps.api_version,
        "kind": ps.kind,
        "metadata": {"name": ps.name, "namespace": ps.namespace, "uid": ps.metadata.uid},
    }
