"""The nhigate custom resources: pydantic models, CRD schemas, conditions, compilation.

`nhigate.api.models` holds the four resources (IdentityIssuer, ProtectedService,
RouteGrant, Revocation); `nhigate.api.conditions` the condition vocabulary;
`nhigate.api.compile` turns resources into a `PolicyDocument`;
`nhigate.api.resources` loads them from YAML files.
"""

from nhigate.api.durations import duration_seconds, parse_duration
from nhigate.api.models import (
    API_VERSION,
    GROUP,
    RESOURCE_BY_KIND,
    RESOURCE_TYPES,
    VERSION,
    IdentityIssuer,
    ObjectMeta,
    ProtectedService,
    Resource,
    Revocation,
    RouteGrant,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "RESOURCE_BY_KIND",
    "RESOURCE_TYPES",
    "VERSION",
    "IdentityIssuer",
    "ObjectMeta",
    "ProtectedService",
    "Resource",
    "Revocation",
    "RouteGrant",
    "duration_seconds",
    "parse_duration",
]
