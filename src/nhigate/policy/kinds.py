"""The nhigate API group and version, and each custom resource's kind and plural, named once.

Stdlib only, so `nhigate.k8s` (and through it the proxy) can build REST paths without loading
the pydantic models of `nhigate.api`, which take these names for the CRDs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

GROUP: Final = "nhigate.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"


@dataclass(frozen=True, slots=True)
class CustomKind:
    """One nhigate custom resource type: its `kind`, URL plural and kubectl short name."""

    kind: str
    plural: str
    short_name: str


IDENTITY_ISSUER: Final = CustomKind("IdentityIssuer", "identityissuers", "nhiiss")
PROTECTED_SERVICE: Final = CustomKind("ProtectedService", "protectedservices", "nhips")
ROUTE_GRANT: Final = CustomKind("RouteGrant", "routegrants", "nhirg")
REVOCATION: Final = CustomKind("Revocation", "revocations", "nhirev")
