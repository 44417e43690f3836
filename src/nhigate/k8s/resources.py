"""The Kubernetes resources nhigate reads or writes, named once.

A `ResourceRef` is everything needed to build a REST path for a resource type;
`ref_for(api_version, kind)` maps an object's own `apiVersion`/`kind` back to
its ref (server-side apply needs the path from the object alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from nhigate.policy.kinds import (
    GROUP,
    IDENTITY_ISSUER,
    PROTECTED_SERVICE,
    REVOCATION,
    ROUTE_GRANT,
    VERSION,
    CustomKind,
)


@dataclass(frozen=True, slots=True)
class ResourceRef:
    """One resource type of the Kubernetes API."""

    group: str
    """API group; "" for the core group."""
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        """The `apiVersion` objects of this type carry ("v1" or "group/version")."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """REST path of the collection (name None) or of one object."""
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            prefix += f"/namespaces/{quote(namespace, safe='')}"
        elif self.namespaced and name is not None:
            raise ValueError(f"{self.kind} {name!r} is namespaced: a namespace is required")
        prefix += f"/{self.plural}"
        if name is not None:
            prefix += f"/{quote(name, safe='')}"
        return prefix


CONFIGMAPS = ResourceRef("", "v1", "configmaps", "ConfigMap")
SECRETS = ResourceRef("", "v1", "secrets", "Secret")
SERVICES = ResourceRef("", "v1", "services", "Service")
SERVICEACCOUNTS = ResourceRef("", "v1", "serviceaccounts", "ServiceAccount")
PODS = ResourceRef("", "v1", "pods", "Pod")
EVENTS = ResourceRef("", "v1", "events", "Event")
NAMESPACES = ResourceRef("", "v1", "namespaces", "Namespace", namespaced=False)
LEASES = ResourceRef("coordination.k8s.io", "v1", "leases", "Lease")
DEPLOYMENTS = ResourceRef("apps", "v1", "deployments", "Deployment")
ROLES = ResourceRef("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDINGS = ResourceRef("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
NETWORKPOLICIES = ResourceRef("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
PDBS = ResourceRef("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
HPAS = ResourceRef("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
INGRESSES = ResourceRef("networking.k8s.io", "v1", "ingresses", "Ingress")
HTTPROUTES = ResourceRef("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
CUSTOMRESOURCEDEFINITIONS = ResourceRef(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    namespaced=False,
)


def _custom(custom: CustomKind) -> ResourceRef:
    return ResourceRef(GROUP, VERSION, custom.plural, custom.kind)


IDENTITYISSUERS = _custom(IDENTITY_ISSUER)
PROTECTEDSERVICES = _custom(PROTECTED_SERVICE)
ROUTEGRANTS = _custom(ROUTE_GRANT)
REVOCATIONS = _custom(REVOCATION)

ALL_RESOURCES: tuple[ResourceRef, ...] = (
    CONFIGMAPS, SECRETS, SERVICES, SERVICEACCOUNTS, PODS, EVENTS, NAMESPACES, LEASES,
    DEPLOYMENTS, ROLES, ROLEBINDINGS, NETWORKPOLICIES, PDBS, HPAS, INGRESSES, HTTPROUTES,
    CUSTOMRESOURCEDEFINITIONS, IDENTITYISSUERS, PROTECTEDSERVICES, ROUTEGRANTS, REVOCATIONS,
)  # fmt: skip

_BY_TYPE: dict[tuple[str, str], ResourceRef] = {(r.api_version, r.kind): r for r in ALL_RESOURCES}


def ref_for(api_version: str, kind: str) -> ResourceRef:
    """The ref for an object's `apiVersion` and `kind`; ValueError if nhigate does not know it."""
    try:
        return _BY_TYPE[(api_version, kind)]
    except KeyError:
        raise ValueError(f"unknown resource type {api_version} {kind}") from None


def ref_of(obj: dict[str, object]) -> ResourceRef:
    """The ref of a JSON object, from its own `apiVersion` and `kind`."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ValueError("object has no apiVersion/kind")
    return ref_for(api_version, kind)
