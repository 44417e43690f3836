"""Pydantic models of the nhigate custom resources (group nhigate.io, version v1alpha1).

These models are the single source of the API: the CRDs in `crds/` are
generated from them (`hack/generate_crds.py`), and the controller, the
standalone proxy and `nhigate explain` all validate resources with them.
Field names are snake_case in Python and camelCase on the wire; every model
accepts either. Every CEL rule in the CRDs is mirrored here (see
`nhigate.api.validation`), so what the API server rejects, Python rejects too.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from nhigate.api.durations import DURATION_PATTERN, parse_duration
from nhigate.api.validation import CAMEL_CASE, Cel, CelRule, SpecModel, StatusModel
from nhigate.policy import kinds
from nhigate.policy.names import MCP_ENDPOINT_PATTERN
from nhigate.policy.paths import PathPattern

__all__ = [
    "API_VERSION",
    "GROUP",
    "RESOURCE_BY_KIND",
    "RESOURCE_TYPES",
    "ROOT_RULES",
    "VERSION",
    "Algorithm",
    "AutoscalingSpec",
    "BackendProtocol",
    "BackendRef",
    "BypassPath",
    "ClientConnectionsSpec",
    "ComputeResources",
    "Condition",
    "ConditionStatus",
    "DelegationSpec",
    "IPBlock",
    "IdentityAssertionSpec",
    "IdentityIssuer",
    "IdentityIssuerSpec",
    "IdentityIssuerStatus",
    "IsolationMode",
    "IsolationSpec",
    "Jwk",
    "Jwks",
    "KubernetesIssuerSource",
    "LabelSelector",
    "LabelSelectorRequirement",
    "McpRuleSpec",
    "McpSpec",
    "Method",
    "NetworkPeer",
    "ObjectMeta",
    "ProtectedService",
    "ProtectedServiceSpec",
    "ProtectedServiceStatus",
    "ProxySpec",
    "ProxyTLS",
    "RateLimitSpec",
    "Resource",
    "ResourceRequirements",
    "Revocation",
    "RevocationSpec",
    "RevocationStatus",
    "RouteGrant",
    "RouteGrantSpec",
    "RouteGrantStatus",
    "RouteRule",
    "ServiceAccountSubjectSpec",
    "ServiceTarget",
    "SubjectSpec",
    "TenantSpec",
    "TokenSubjectSpec",
    "UpstreamCredentialSpec",
    "WebSocketSpec",
    "parse_duration",
]

GROUP = kinds.GROUP
VERSION = kinds.VERSION
API_VERSION = kinds.API_VERSION

# ---------------------------------------------------------------------------------------------
# Scalar types

_DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

ResourceName = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=_DNS1123_SUBDOMAIN)
]
"""The name of a Kubernetes object (DNS-1123 subdomain)."""
NamespaceName = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=_DNS1123_LABEL)
]
ServiceName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=_DNS1035_LABEL)]
Duration = Annotated[str, StringConstraints(max_length=32, pattern=DURATION_PATTERN)]
"""A duration such as "30s", "15m" or "1h30m" (see `parse_duration`)."""
PositiveDuration = Annotated[
    Duration,
    Cel(
        CelRule(
            rule="duration(self) > duration('0s')",
            message="must be longer than 0s",
            check=lambda v: parse_duration(v).total_seconds() > 0,
        )
    ),
]
AssertionTTL = Annotated[
    PositiveDuration,
    Cel(
        CelRule(
            rule="duration(self) <= duration('24h')",
            message="must be at most 24h",
            check=lambda v: parse_duration(v).total_seconds() <= 86400,
        )
    ),
]
RequestHeadTimeout = Annotated[
    Duration,
    Cel(
        CelRule(
            rule="duration(self) >= duration('1s') && duration(self) <= duration('10m')",
            message="must be between 1s and 10m",
            check=lambda v: 1 <= parse_duration(v).total_seconds() <= 600,
        )
    ),
]
IdleTimeout = Annotated[
    Duration,
    Cel(
        CelRule(
            rule="duration(self) >= duration('1s') && duration(self) <= duration('1h')",
            message="must be between 1s and 1h",
            check=lambda v: 1 <= parse_duration(v).total_seconds() <= 3600,
        )
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=253)]
Text = Annotated[str, StringConstraints(max_length=1024)]

# Headers the proxy must own: framing and hop-by-hop headers cannot be injected or renamed.
_RESERVED_HEADERS = (
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
)
_RESERVED_HEADERS_CEL = "[" + ", ".join(f"'{h}'" for h in _RESERVED_HEADERS) + "]"

HeaderName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"),
    Cel(
        CelRule(
            rule=f"!(self.lowerAscii() in {_RESERVED_HEADERS_CEL})",
            message="must not be a hop-by-hop or message-framing header such as Host, "
            "Connection or Content-Length",
            check=lambda v: v.lower() not in _RESERVED_HEADERS,
        )
    ),
]
"""An HTTP header name (RFC 9110 token) that the proxy may set."""

_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(_QUANTITY_PATTERN)


def _quantity_ok(value: int | str) -> int | str:
    if isinstance(value, str) and _QUANTITY.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '100m', '128Mi', '1')")
    return value


def _quantity_json_schema(schema: dict[str, Any]) -> None:
    schema.clear()
    schema.update(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": _QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    )


class _QuantityMarker:
    """Validation + int-or-string schema for a Kubernetes resource quantity."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(
            _quantity_ok,
            core_schema.union_schema(
                [core_schema.int_schema(strict=True), core_schema.str_schema(max_length=64)]
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        result: dict[str, Any] = {}
        _quantity_json_schema(result)
        return result


Quantity = Annotated[int | str, _QuantityMarker]
"""A Kubernetes resource quantity such as "250m", "128Mi" or 2."""


# ---------------------------------------------------------------------------------------------
# Path patterns: the CEL rules and their Python mirror (docs/path-grammar.md)

_PATH_CHARS = "^[-A-Za-z0-9._~!$&'()*+,;=:@/]*$"
_PATH_DOT_SEGMENT = "/[.][.]?(/|;|$)"
_PATH_BAD_WILDCARD = "[^/*][*]|[*][^/*]|[*][*][*]|[*][*]/"

PATH_RULES: tuple[CelRule, ...] = (
    CelRule(
        rule="self.startsWith('/')",
        message='must start with "/"',
        check=lambda v: v.startswith("/"),
    ),
    CelRule(
        rule="!self.contains('//')",
        message='must not contain "//"',
        check=lambda v: "//" not in v,
    ),
    CelRule(
        rule=f"!self.matches('{_PATH_DOT_SEGMENT}')",
        message='must not contain dot-segments ("/./", "/../", or a trailing "/." or "/..")',
        check=lambda v: re.search(_PATH_DOT_SEGMENT, v) is None,
    ),
    CelRule(
        rule="!self.contains('\\\\')",
        message="must not contain a backslash",
        check=lambda v: "\\" not in v,
    ),
    CelRule(
        rule="!self.contains('%')",
        message='must not be percent-encoded ("%"): write the decoded character',
        check=lambda v: "%" not in v,
    ),
    CelRule(
        rule=f'self.matches("{_PATH_CHARS}")',
        message='may only contain letters, digits, "/" and the characters -._~!$&\'()*+,;=:@',
        check=lambda v: re.search(_PATH_CHARS, v) is not None,
    ),
    CelRule(
        rule=f"!self.matches('{_PATH_BAD_WILDCARD}')",
        message='"*" and "**" must be whole segments, and "**" may only be the last segment',
        check=lambda v: re.search(_PATH_BAD_WILDCARD, v) is None,
    ),
)


def _path_pattern_compiles(value: str) -> bool:
    """Final guard: the policy engine's own parser must accept what the CEL rules accept."""
    try:
        PathPattern.compile(value)
    except ValueError:
        return False
    return True


PathPatternText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=512),
    Cel(
        *PATH_RULES,
        CelRule(
            rule=None,
            message="is not a valid path pattern (see docs/path-grammar.md)",
            check=_path_pattern_compiles,
        ),
    ),
]
"""A grant path pattern: exact, `*` for one segment, trailing `/**` for a subtree."""


# ---------------------------------------------------------------------------------------------
# MCP endpoints, name patterns and delegation (docs/mcp.md)

McpEndpointPath = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=MCP_ENDPOINT_PATTERN)
]
"""An exact MCP endpoint path such as `/mcp` (unreserved characters, no trailing slash)."""

NamePattern = Annotated[
    str,
    # Printable ASCII with no "**" (a regex, not CEL: thousands of list items would blow the
    # API server's CEL cost budget).
    StringConstraints(min_length=1, max_length=2048, pattern=r"^\*?([!-)+-~]+\*)*[!-)+-~]*$"),
]
"""A tool, prompt or actor name pattern: printable ASCII, `*` matches any run of characters."""


# ---------------------------------------------------------------------------------------------
# Metadata and conditions


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata nhigate reads; other fields are ignored."""

    model_config = ConfigDict(**CAMEL_CASE, extra="ignore")

    name: ResourceName
    namespace: NamespaceName = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: AwareDatetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ConditionStatus(StrEnum):
    """The status of a condition, as in the Kubernetes API conventions."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """One status condition (see `nhigate.api.conditions` for types and reasons)."""

    type: Annotated[str, StringConstraints(max_length=316)] = Field(
        description="The condition's type in CamelCase, e.g. `Ready`, `Accepted` or `Enforced`."
    )
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    reason: Annotated[str, StringConstraints(max_length=1024)] = Field(
        default="",
        description="A CamelCase, machine-readable reason for the condition's last transition.",
    )
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        default="", description="A human-readable explanation of the condition."
    )
    last_transition_time: AwareDatetime | None = Field(
        default=None,
        description="When `status` last changed (not when the condition was last written).",
    )
    observed_generation: int | None = Field(
        default=None,
        description="The `metadata.generation` the condition was computed from.",
    )


Conditions = Annotated[
    list[Condition],
    Field(
        max_length=16,
        description="The latest observations of the object's state, one per condition type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


def _set_list(max_items: int, min_items: int = 0) -> Any:
    """A list with set semantics (no duplicates), bounded for CEL cost estimation."""
    return Field(
        min_length=min_items,
        max_length=max_items,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


_T = TypeVar("_T")


def _reject_duplicates(values: list[_T]) -> list[_T]:
    seen: set[_T] = set()
    for value in values:
        if value in seen:
            raise PydanticCustomError(
                "duplicate", "Duplicate value: {value}", {"value": str(value)}
            )
        seen.add(value)
    return values


_Unique = AfterValidator(_reject_duplicates)


# ---------------------------------------------------------------------------------------------
# Shared spec parts


class RateLimitSpec(SpecModel):
    """A token bucket, enforced per proxy replica."""

    requests_per_second: float = Field(gt=0, le=1_000_000, description="Refill rate.")
    burst: int = Field(ge=1, le=1_000_000, description="Bucket capacity.")


class ServiceTarget(SpecModel):
    """A ProtectedService in the same namespace."""

    protected_service: ResourceName = Field(description="Name of the ProtectedService.")


# ---------------------------------------------------------------------------------------------
# IdentityIssuer


class Algorithm(StrEnum):
    """Signature algorithms a token may use. `none` and HMAC are deliberately absent."""

    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    PS256 = "PS256"
    PS384 = "PS384"
    PS512 = "PS512"
    ES256 = "ES256"
    ES384 = "ES384"
    ES512 = "ES512"
    EDDSA = "EdDSA"


_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")
_JwkValue = Annotated[str, StringConstraints(max_length=4096)]
_PrivateMember = Annotated[str, StringConstraints(max_length=8192)] | None


class KeyType(StrEnum):
    """Asymmetric JWK key types; symmetric (`oct`) keys are not accepted."""

    EC = "EC"
    RSA = "RSA"
    OKP = "OKP"


class Jwk(SpecModel):
    """One public JSON Web Key; members not listed here are kept as written."""

    model_config = ConfigDict(extra="allow")

    kty: KeyType = Field(description="Key type (RFC 7517 `kty`): `EC`, `RSA` or `OKP`.")
    kid: _JwkValue | None = Field(
        default=None, description="Key ID: matched against a token's `kid` header."
    )
    use: _JwkValue | None = Field(default=None, description='Public key use, e.g. "sig".')
    alg: _JwkValue | None = Field(
        default=None, description="The algorithm the key is meant for, e.g. ES256."
    )
    crv: _JwkValue | None = Field(
        default=None, description="Curve of an EC or OKP key, e.g. P-256 or Ed25519."
    )
    x: _JwkValue | None = Field(
        default=None, description="EC/OKP public key: x coordinate (base64url)."
    )
    y: _JwkValue | None = Field(
        default=None, description="EC public key: y coordinate (base64url)."
    )
    n: _JwkValue | None = Field(default=None, description="RSA public key: modulus (base64url).")
    e: _JwkValue | None = Field(default=None, description="RSA public key: exponent (base64url).")
    d: _PrivateMember = Field(default=None, description="Private key material: must be absent.")
    p: _PrivateMember = Field(default=None, description="Private key material: must be absent.")
    q: _PrivateMember = Field(default=None, description="Private key material: must be absent.")
    dp: _PrivateMember = Field(default=None, description="Private key material: must be absent.")
    dq: _PrivateMember = Field(default=None, description="Private key material: must be absent.")
    qi: _PrivateMember = Field(default=None, description="Private key material: must be absent.")
    k: _PrivateMember = Field(default=None, description="Private key material: must be absent.")

    cel_rules = (
        CelRule(
            rule=" && ".join(f"!has(self.{m})" for m in _PRIVATE_JWK_MEMBERS),
            message="inline jwks must hold public keys only (found private key members)",
            check=lambda jwk: all(getattr(jwk, m) is None for m in _PRIVATE_JWK_MEMBERS),
        ),
    )


class Jwks(SpecModel):
    """An inline JWK Set."""

    keys: list[Jwk] = Field(
        min_length=1, max_length=64, description="The public keys tokens may be signed with."
    )


class KubernetesIssuerSource(SpecModel):
    """The cluster's own service-account issuer; the controller reads `/openid/v1/jwks`."""


class IdentityIssuerSpec(SpecModel):
    """Whom we trust to mint machine credentials."""

    issuer: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="The exact `iss` claim of accepted tokens."
    )
    jwks_uri: Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://")] | None = (
        Field(default=None, description="Where to fetch the JWK Set (https:// or http://).")
    )
    jwks: Jwks | None = Field(default=None, description="An inline JWK Set (public keys only).")
    kubernetes: KubernetesIssuerSource | None = Field(
        default=None,
        description="`{}`: the cluster's service-account issuer (keys read from the API server).",
    )
    audiences: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=1024)]],
        _set_list(32, 1),
        _Unique,
    ] = Field(description="Accepted `aud` values; a token must name at least one.")
    algorithms: Annotated[list[Algorithm], _set_list(10, 1), _Unique] = Field(
        default=[Algorithm.RS256, Algorithm.ES256],
        description="Accepted signature algorithms.",
    )
    max_token_lifetime: PositiveDuration = Field(
        default="1h", description="Tokens whose `exp - iat` is longer are rejected."
    )
    clock_skew: Duration = Field(default="30s", description="Tolerance for `exp`/`nbf`/`iat`.")
    refresh_interval: PositiveDuration = Field(
        default="5m", description="How often keys are re-fetched."
    )

    cel_rules = (
        CelRule(
            rule="(has(self.jwksUri) ? 1 : 0) + (has(self.jwks) ? 1 : 0)"
            " + (has(self.kubernetes) ? 1 : 0) == 1",
            message="exactly one of jwksUri, jwks or kubernetes must be set",
            check=lambda s: [s.jwks_uri, s.jwks, s.kubernetes].count(None) == 2,
        ),
    )


class IdentityIssuerStatus(StatusModel):
    """What the controller last observed about an issuer."""

    conditions: Conditions = []
    key_count: int | None = Field(
        default=None, description="How many keys the last successful fetch returned."
    )
    last_refresh_time: AwareDatetime | None = Field(
        default=None, description="When the keys were last fetched and parsed."
    )
    observed_generation: int | None = Field(
        default=None, description="The `metadata.generation` this status describes."
    )


# ---------------------------------------------------------------------------------------------
# ProtectedService


class BackendProtocol(StrEnum):
    """The HTTP version the backend speaks (docs/usage.md#grpc-grants)."""

    HTTP1 = "HTTP/1.1"
    """HTTP/1.1, the default."""
    HTTP2 = "HTTP/2"
    """HTTP/2 without TLS (h2c, prior knowledge), e.g. a gRPC server."""


class BackendRef(SpecModel):
    """The Service the proxy forwards to (same namespace)."""

    service: ServiceName = Field(description="Name of the backend Service.")
    port: Port = Field(description="The Service port (not the target port).")
    protocol: BackendProtocol | None = Field(
        default=None,
        description="`HTTP/1.1` or `HTTP/2` (h2c: gRPC backends). With `HTTP/2` the proxy also "
        "speaks HTTP/2 to callers (docs/proxy.md#http2-and-grpc). Absent: the backend Service "
        "port's `appProtocol` decides (`kubernetes.io/h2c`, `grpc`, `http2`, `h2c`: HTTP/2), "
        "else HTTP/1.1 (`websocket` needs HTTP/1.1). A declaration that disagrees with "
        "`appProtocol` leaves the proxy as it was, `BackendProtocolResolved=False` "
        "(docs/troubleshooting.md#backendprotocolresolved--false-appprotocolmismatch). gRPC "
        "grants: docs/usage.md#grpc-grants.",
    )


class ComputeResources(SpecModel):
    """CPU and memory quantities."""

    cpu: Quantity | None = Field(default=None, description='CPU, e.g. "250m" or 1.')
    memory: Quantity | None = Field(default=None, description='Memory, e.g. "128Mi".')


class ResourceRequirements(SpecModel):
    """Requests and limits for each proxy container."""

    requests: ComputeResources | None = Field(
        default=None, description="What the scheduler reserves for each proxy container."
    )
    limits: ComputeResources | None = Field(
        default=None, description="The most each proxy container may use."
    )


class ProxyTLS(SpecModel):
    """TLS for the proxy listener; with `clientCASecretName`, client certificates are verified."""

    secret_name: ResourceName = Field(description="A kubernetes.io/tls Secret: the server cert.")
    client_ca_secret_name: ResourceName | None = Field(
        default=None,
        alias="clientCASecretName",
        description="Secret with `ca.crt`: require and verify client certificates (mTLS/SPIFFE).",
    )


class AutoscalingSpec(SpecModel):
    """A HorizontalPodAutoscaler for the proxy Deployment."""

    min_replicas: int = Field(
        default=2, ge=1, le=100, description="The fewest proxy replicas the autoscaler keeps."
    )
    max_replicas: int = Field(
        ge=1, le=100, description="The most proxy replicas the autoscaler may run."
    )
    target_cpu_utilization_percentage: int = Field(
        default=80,
        ge=1,
        le=100,
        alias="targetCPUUtilizationPercentage",
        description="Average CPU use, in percent of the request, the autoscaler aims for.",
    )

    cel_rules = (
        CelRule(
            rule="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not be greater than maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
        ),
    )


class ClientConnectionsSpec(SpecModel):
    """Limits on callers' connections to each proxy replica (docs/proxy.md#client-connections)."""

    request_head_timeout: RequestHeadTimeout = Field(
        default="60s",
        description="The whole request head must arrive within this, however slowly its bytes "
        "trickle in (from accept, or from the first byte of a later request); then 408, or "
        "a silent close if nothing was sent. Like nginx's client_header_timeout.",
    )
    idle_timeout: IdleTimeout = Field(
        default="75s",
        description="A kept-alive connection with no request for this long is closed. Like "
        "nginx's keepalive_timeout.",
    )
    max_connections: int = Field(
        default=4096,
        ge=16,
        le=1_000_000,
        description="Open client connections per replica; more are refused with 503 and "
        "counted in nhigate_proxy_connections_refused_total.",
    )


class ProxySpec(SpecModel):
    """The proxy Deployment nhigate runs in front of the backend."""

    replicas: int = Field(default=2, ge=0, le=100, description="Ignored when autoscaling is set.")
    port: Port = Field(default=8443, description="Port of the proxy Service and container.")
    admin_port: Port = Field(default=9090, description="Health, readiness, metrics and JWKS port.")
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        default=None, description="Proxy image; defaults to the controller's own image."
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="CPU and memory requests and limits of each proxy container."
    )
    tls: ProxyTLS | None = Field(
        default=None, description="Serve TLS (and optionally verify client certificates)."
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Scale the proxy with a HorizontalPodAutoscaler."
    )
    connections: ClientConnectionsSpec = Field(
        default_factory=ClientConnectionsSpec,
        description="Request-head and idle timeouts and the connection bound of each replica.",
        json_schema_extra={"default": {}},
    )

    cel_rules = (
        CelRule(
            # has() guards: the API server also checks this rule against the `{}` default of
            # `proxy`, where the nested defaults have not been applied yet.
            rule="!has(self.port) || !has(self.adminPort) || self.port != self.adminPort",
            message="port and adminPort must differ",
            check=lambda p: p.port != p.admin_port,
        ),
    )


class IsolationMode(StrEnum):
    """How the backend is fenced off from everything but the proxy."""

    ENFORCE = "Enforce"
    """A NetworkPolicy admits only proxy pods (and `allowFrom`) to the backend port."""
    AUDIT = "Audit"
    """No NetworkPolicy is written; direct paths are still detected and reported."""
    OFF = "Off"
    """No NetworkPolicy and no bypass reporting."""


class LabelSelectorRequirement(SpecModel):
    """One `matchExpressions` entry."""

    key: Annotated[str, StringConstraints(min_length=1, max_length=317)] = Field(
        description="The label key the requirement applies to."
    )
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the label's value relates to `values`."
    )
    values: list[Annotated[str, StringConstraints(max_length=63)]] = Field(
        default=[],
        max_length=64,
        description="For `In`/`NotIn`: the values; for `Exists`/`DoesNotExist`: empty.",
    )


class LabelSelector(SpecModel):
    """A Kubernetes label selector; empty selects everything."""

    match_labels: dict[str, Annotated[str, StringConstraints(max_length=63)]] | None = Field(
        default=None,
        description="Labels that must all be present with exactly these values.",
        json_schema_extra={"maxProperties": 32},
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=16, description="Requirements that must all hold (ANDed)."
    )


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return "/" in value


_CIDR_RULE = CelRule(
    rule="isCIDR(self)", message="must be a CIDR such as 10.0.0.0/8", check=_is_cidr
)
Cidr = Annotated[str, StringConstraints(min_length=1, max_length=64), Cel(_CIDR_RULE)]


class IPBlock(SpecModel):
    """An IP range, as in a NetworkPolicy peer."""

    cidr: Cidr = Field(description="The range, e.g. 10.0.0.0/8 or fd00::/8.")
    except_: list[Cidr] | None = Field(
        default=None,
        alias="except",
        max_length=32,
        description="Ranges inside `cidr` that are not admitted.",
    )


class NetworkPeer(SpecModel):
    """An extra source allowed to reach the backend directly (e.g. a metrics scraper)."""

    pod_selector: LabelSelector | None = Field(
        default=None,
        description="Pods admitted (in the ProtectedService's namespace unless "
        "`namespaceSelector` is also set).",
    )
    namespace_selector: LabelSelector | None = Field(
        default=None,
        description="Namespaces whose pods (or those `podSelector` picks) are admitted.",
    )
    ip_block: IPBlock | None = Field(default=None, description="An IP range admitted.")

    cel_rules = (
        CelRule(
            rule="has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)",
            message="set at least one of podSelector, namespaceSelector or ipBlock",
            check=lambda p: any(
                x is not None for x in (p.pod_selector, p.namespace_selector, p.ip_block)
            ),
        ),
        CelRule(
            rule="!has(self.ipBlock) || (!has(self.podSelector) && !has(self.namespaceSelector))",
            message="ipBlock cannot be combined with podSelector or namespaceSelector",
            check=lambda p: (
                p.ip_block is None or (p.pod_selector is None and p.namespace_selector is None)
            ),
        ),
    )


class IsolationSpec(SpecModel):
    """Network isolation of the backend."""

    mode: IsolationMode = Field(
        default=IsolationMode.ENFORCE,
        description="`Enforce`: a NetworkPolicy admits only the proxy (and `allowFrom`) to the "
        "backend port; `Audit`: no NetworkPolicy, direct paths are reported; `Off`: neither.",
    )
    allow_from: list[NetworkPeer] = Field(
        default=[],
        max_length=32,
        description="Extra peers admitted to the backend directly, e.g. a metrics scraper.",
    )


_DATA_ITEM_NAME = r"^[-._a-zA-Z0-9]+$"


class UpstreamCredentialSpec(SpecModel):
    """A Secret key the proxy injects upstream as a header, so callers never hold it."""

    secret_name: ResourceName = Field(
        description="The Secret (same namespace) holding the backend's credential."
    )
    key: Annotated[
        str,
        StringConstraints(min_length=1, max_length=253, pattern=_DATA_ITEM_NAME),
        Cel(
            CelRule(
                rule="self != '.' && self != '..'",
                message='must not be "." or ".."',
                check=lambda k: k not in (".", ".."),
            )
        ),
    ] = Field(description="Key in the Secret; mounted as a file of that name.")
    header: HeaderName = Field(
        default="Authorization",
        description="The request header the credential is sent in (a caller's value is replaced).",
    )
    prefix: Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")] = (
        Field(default="", description='Prepended to the value, e.g. "Bearer ".')
    )


class IdentityAssertionSpec(SpecModel):
    """A short-lived JWT the proxy signs and sends upstream with each request."""

    enabled: bool = Field(default=True, description="Send the assertion (false: do not).")
    header: HeaderName = Field(
        default="X-Nhigate-Assertion",
        description="The request header the assertion is sent in (a caller's value is replaced).",
    )
    audience: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description="The `aud` of the assertion; default: `<namespace>/<name>`."
    )
    ttl: AssertionTTL = Field(default="60s", description="Lifetime of each assertion.")


class TenantSpec(SpecModel):
    """Where a request's tenant comes from; when both are set they must agree."""

    header: HeaderName | None = Field(
        default=None, description="A request header that names the tenant."
    )
    claim: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        default=None, description="A token claim that names the tenant."
    )

    cel_rules = (
        CelRule(
            rule="has(self.header) || has(self.claim)",
            message="tenant needs a header or a claim",
            check=lambda t: t.header is not None or t.claim is not None,
        ),
    )


class McpSpec(SpecModel):
    """Which paths of the backend speak MCP (Streamable HTTP transport)."""

    endpoints: Annotated[list[McpEndpointPath], _set_list(8, 1), _Unique] = Field(
        description="Exact MCP endpoint paths, e.g. /mcp. Each covers its sub-paths in any "
        "letter case; only MCP rules reach them (docs/mcp.md)."
    )


class WebSocketSpec(SpecModel):
    """Which paths of the backend accept WebSocket connections (docs/proxy.md#websocket)."""

    paths: Annotated[list[PathPatternText], _set_list(32, 1), _Unique] = Field(
        description="Path patterns (the RouteGrant grammar) where the proxy relays a WebSocket "
        "upgrade; a connection still needs a grant for GET on its path. Upgrades anywhere "
        "else are refused with 400 upgrade_rejected."
    )


class OverrideHandling(StrEnum):
    """What the proxy does with a request that asks the backend for another method or path."""

    REJECT = "Reject"
    """Refuse it: 400 `override_rejected` (the default; docs/security.md lists the names)."""
    AUTHORIZE = "Authorize"
    """The backend honours overrides: the override must be granted as well as the request line."""


class OverridesSpec(SpecModel):
    """Method- and path-override headers and parameters (docs/security.md#overrides)."""

    method: OverrideHandling = Field(
        default=OverrideHandling.REJECT,
        description="X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override, `_method`, ...: "
        "Reject (400) or Authorize (the override method must be granted too).",
    )
    path: OverrideHandling = Field(
        default=OverrideHandling.REJECT,
        description="X-Original-URL, X-Rewrite-URL, X-Forwarded-Uri, ...: Reject (400) or "
        "Authorize (the override path must be granted too).",
    )


class GrantPolicySpec(SpecModel):
    """Rules every RouteGrant targeting the service must keep (docs/operations.md, "Grant
    policy"). A grant that breaks one is `Accepted=False` with the rule as reason, and is not
    compiled into the policy."""

    max_duration: PositiveDuration | None = Field(
        default=None,
        description="Longest window a grant may open: from the later of `notBefore` and the "
        "grant's creation to `expiresAt` (so a grant needs `expiresAt`). Extending an old grant "
        'past it means a new grant. E.g. "8h".',
    )
    require_expiry: bool = Field(
        default=False, description="Every grant must set `expiresAt` (no open-ended access)."
    )
    require_reason: bool = Field(
        default=False, description="Every grant must set a non-blank `reason` (kept in the audit)."
    )
    allowed_issuers: Annotated[list[ResourceName], _set_list(16, 1), _Unique] | None = Field(
        default=None,
        description="IdentityIssuers grants may name: a `token` subject must name one, a "
        "`serviceAccount` subject needs one of them to be a `kubernetes` issuer, and `spiffeId` "
        "subjects (no issuer) are refused. Absent: every issuer in `issuers`.",
    )
    unused_after: PositiveDuration | None = Field(
        default=None,
        description="A grant with no allowed request for this long is `Unused=True`. Absent: the "
        'controller\'s `--unused-after` (default 168h). E.g. "720h".',
    )


class ProtectedServiceSpec(SpecModel):
    """One backend Service put behind an nhigate proxy."""

    backend: BackendRef = Field(description="The Service the proxy forwards to (same namespace).")
    issuers: Annotated[list[ResourceName], _set_list(16, 1), _Unique] = Field(
        description="Names of IdentityIssuers (same namespace) whose tokens are accepted."
    )
    proxy: ProxySpec = Field(
        default_factory=ProxySpec,
        description="The proxy Deployment nhigate runs in front of the backend.",
        json_schema_extra={"default": {}},
    )
    isolation: IsolationSpec = Field(
        default_factory=IsolationSpec,
        description="How the backend is fenced off from everything but the proxy.",
        json_schema_extra={"default": {}},
    )
    upstream_credential: UpstreamCredentialSpec | None = Field(
        default=None,
        description="A Secret key the proxy sends upstream as a header, so callers never hold it.",
    )
    identity_assertion: IdentityAssertionSpec | None = Field(
        default=None,
        description="A short-lived JWT, signed by the proxy, sent upstream with each request.",
    )
    tenant: TenantSpec | None = Field(
        default=None, description="Where a request's tenant comes from (see RouteGrant `tenant`)."
    )
    rate_limit: RateLimitSpec | None = Field(
        default=None, description="Default rate limit per caller identity, per proxy replica."
    )
    mcp: McpSpec | None = Field(
        default=None, description="MCP endpoints: JSON-RPC bodies decided per tool (docs/mcp.md)."
    )
    overrides: OverridesSpec | None = Field(
        default=None,
        description="Requests naming another method or path for the backend are refused "
        "unless this says the backend honours them (then both must be granted).",
    )
    grant_policy: GrantPolicySpec | None = Field(
        default=None,
        description="Rules every RouteGrant for this service must keep: maximum duration, "
        "expiry and reason required, allowed issuers.",
    )
    websocket: WebSocketSpec | None = Field(
        default=None,
        description="WebSocket endpoints. Absent: every upgrade request is refused "
        "(docs/proxy.md#websocket).",
    )

    cel_rules = (
        CelRule(
            rule="!has(self.websocket) || !has(self.backend.protocol) "
            "|| self.backend.protocol != 'HTTP/2'",
            message="websocket needs backend.protocol HTTP/1.1: WebSocket over HTTP/2 "
            "(RFC 8441 extended CONNECT) is not supported",
            check=lambda s: s.websocket is None or s.backend.protocol != BackendProtocol.HTTP2,
            field_path=".websocket",
        ),
    )


class BypassPath(StatusModel):
    """A direct path to the backend that does not go through the proxy."""

    kind: str = Field(
        description="Kind of the object that opens the path, e.g. NetworkPolicy or Service."
    )
    namespace: str = Field(default="", description="Namespace of that object.")
    name: str = Field(description="Name of that object.")
    reason: str = Field(default="", description="How the object reaches the backend directly.")


class ProtectedServiceStatus(StatusModel):
    """What the controller last observed about a protected service."""

    conditions: Conditions = []
    bypass_paths: list[BypassPath] = Field(
        default=[], description="Every direct path to the backend that skips the proxy."
    )
    policy_version: str | None = Field(
        default=None, description="Version (content hash) of the policy compiled for the proxy."
    )
    enforced_replicas: str | None = Field(
        default=None,
        description='Live proxy replicas serving `policyVersion` out of all live replicas: "2/3".',
    )
    endpoint: str | None = Field(
        default=None, description="The in-cluster URL callers use: the proxy Service."
    )
    backend_protocol: BackendProtocol | None = Field(
        default=None,
        description="The protocol the proxy speaks to the backend (and, for HTTP/2, to "
        "callers), as resolved: see the `BackendProtocolResolved` condition.",
    )
    observed_generation: int | None = Field(
        default=None, description="The `metadata.generation` this status describes."
    )


# ---------------------------------------------------------------------------------------------
# RouteGrant


class Method(StrEnum):
    """HTTP methods a rule may grant; `*` is any method."""

    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    PATCH = "PATCH"
    DELETE = "DELETE"
    OPTIONS = "OPTIONS"
    ANY = "*"


class DelegationSpec(SpecModel):
    """Which RFC 8693 actor chains (`act` claims) may present this subject's tokens."""

    actors: Annotated[list[NamePattern], _set_list(32, 1), _Unique] = Field(
        description="Actor `sub` values (name patterns) that may act for the subject; every "
        "actor in the chain must match one."
    )
    max_depth: int = Field(default=1, ge=1, le=8, description="Longest actor chain accepted.")
    required: bool = Field(
        default=False, description="Refuse this subject's tokens when no actor is present."
    )


_DELEGATION_DESCRIPTION = (
    "Actor chains accepted (RFC 8693 `act`). Absent: only tokens without an actor chain."
)


class ServiceAccountSubjectSpec(SpecModel):
    """A Kubernetes service account (its token verified by a `kubernetes` issuer)."""

    namespace: NamespaceName = Field(description="Namespace of the service account.")
    name: ResourceName = Field(description="Name of the service account.")
    delegation: DelegationSpec | None = Field(default=None, description=_DELEGATION_DESCRIPTION)


class TokenSubjectSpec(SpecModel):
    """Tokens from one IdentityIssuer, by `sub` and/or exact claim values."""

    issuer: ResourceName = Field(description="Name of the IdentityIssuer (same namespace).")
    subject: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description="The exact `sub` claim."
    )
    claims: dict[str, Annotated[str, StringConstraints(max_length=1024)]] | None = Field(
        default=None,
        description="Claims that must all equal these strings.",
        json_schema_extra={"maxProperties": 16},
    )
    delegation: DelegationSpec | None = Field(default=None, description=_DELEGATION_DESCRIPTION)

    cel_rules = (
        CelRule(
            rule="has(self.subject) || (has(self.claims) && size(self.claims) > 0)",
            message="a token subject needs subject or at least one claim",
            check=lambda t: t.subject is not None or bool(t.claims),
        ),
    )


_SPIFFE_RULE = CelRule(
    rule="self.startsWith('spiffe://')",
    message='must start with "spiffe://"',
    check=lambda v: v.startswith("spiffe://"),
)


class SubjectSpec(SpecModel):
    """Who is granted: exactly one of serviceAccount, token or spiffeId."""

    service_account: ServiceAccountSubjectSpec | None = Field(
        default=None,
        description="A Kubernetes service account (its token verified by a `kubernetes` issuer).",
    )
    token: TokenSubjectSpec | None = Field(
        default=None, description="Tokens from one IdentityIssuer, by `sub` and/or claim values."
    )
    spiffe_id: (
        Annotated[str, StringConstraints(min_length=1, max_length=2048), Cel(_SPIFFE_RULE)] | None
    ) = Field(default=None, description="An exact SPIFFE ID from an mTLS client certificate.")

    cel_rules = (
        CelRule(
            rule="(has(self.serviceAccount) ? 1 : 0) + (has(self.token) ? 1 : 0)"
            " + (has(self.spiffeId) ? 1 : 0) == 1",
            message="each subject must set exactly one of serviceAccount, token or spiffeId",
            check=lambda s: [s.service_account, s.token, s.spiffe_id].count(None) == 2,
        ),
    )


class McpRuleSpec(SpecModel):
    """MCP tools, resources and prompts the subjects may use (docs/mcp.md)."""

    endpoints: Annotated[list[McpEndpointPath], _set_list(8, 1), _Unique] | None = Field(
        default=None,
        description="MCP endpoints of the target this rule covers. Absent: all of them.",
    )
    tools: Annotated[list[NamePattern], _set_list(128, 0), _Unique] | None = Field(
        default=None, description="Tool names (`tools/call`), e.g. get_weather or search_*."
    )
    resources: Annotated[list[NamePattern], _set_list(128, 0), _Unique] | None = Field(
        default=None, description="Resource URIs (`resources/read`), e.g. file:///docs/*."
    )
    prompts: Annotated[list[NamePattern], _set_list(128, 0), _Unique] | None = Field(
        default=None, description="Prompt names (`prompts/get`)."
    )

    cel_rules = (
        CelRule(
            rule="(has(self.tools) ? size(self.tools) : 0) + (has(self.resources) ? "
            "size(self.resources) : 0) + (has(self.prompts) ? size(self.prompts) : 0) > 0",
            message="an MCP rule needs at least one tool, resource or prompt",
            check=lambda r: bool(r.tools or r.resources or r.prompts),
        ),
    )


class RouteRule(SpecModel):
    """Methods x path patterns (docs/path-grammar.md), or an MCP rule (docs/mcp.md)."""

    methods: Annotated[list[Method], _set_list(8, 1), _Unique] | None = Field(
        default=None, description="HTTP methods allowed, e.g. GET, POST; `*` is any method."
    )
    paths: list[PathPatternText] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Path patterns allowed: an exact path, `*` for one segment, a trailing `/**` "
        "for a subtree (docs/path-grammar.md).",
    )
    mcp: McpRuleSpec | None = Field(
        default=None, description="Tools, resources and prompts on the target's MCP endpoints."
    )

    cel_rules = (
        CelRule(
            rule="has(self.mcp) ? !has(self.methods) && !has(self.paths) "
            ": has(self.methods) && has(self.paths)",
            message="a rule sets either methods and paths, or mcp",
            check=lambda r: (
                r.methods is None and r.paths is None
                if r.mcp is not None
                else r.methods is not None and r.paths is not None
            ),
        ),
    )


class RouteGrantSpec(SpecModel):
    """Who may do what, on which ProtectedService, until when."""

    target: ServiceTarget = Field(
        description="The ProtectedService (same namespace) it applies to."
    )
    subjects: list[SubjectSpec] = Field(
        min_length=1,
        max_length=256,
        description="Who is granted; a request matching any one subject qualifies.",
    )
    rules: list[RouteRule] = Field(
        min_length=1,
        max_length=128,
        description="What is granted; a request matching any one rule is allowed.",
    )
    tenant: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = Field(
        default=None, description="The tenant a request must resolve to."
    )
    not_before: AwareDatetime | None = Field(default=None, description="Not valid before.")
    expires_at: AwareDatetime | None = Field(default=None, description="Not valid from then on.")
    rate_limit: RateLimitSpec | None = Field(
        default=None, description="Per caller identity, per proxy replica."
    )
    reason: Text | None = Field(default=None, description="Why; kept in the audit trail.")

    cel_rules = (
        CelRule(
            rule="!has(self.notBefore) || !has(self.expiresAt) || self.expiresAt > self.notBefore",
            message="expiresAt must be after notBefore",
            check=lambda g: (
                g.not_before is None or g.expires_at is None or g.expires_at > g.not_before
            ),
            field_path=".expiresAt",
        ),
    )


class RuleUsage(StatusModel):
    """Use of one rule of the grant, summed over proxy replicas (docs/usage.md)."""

    index: int = Field(ge=0, description="Position of the rule in `spec.rules`.")
    fingerprint: str = Field(
        description="Digest of the rule's content; a changed rule starts with no usage."
    )
    last_used: AwareDatetime | None = Field(
        default=None, description="Last request this rule allowed (never moves backwards)."
    )
    requests: int = Field(default=0, ge=0, description="Requests it allowed in `window`.")
    shapes: list[str] = Field(
        default=[],
        description="Distinct method + path shapes seen (identifiers folded to `*`), at most 8.",
    )
    more_shapes: bool = Field(default=False, description="More shapes were seen than are listed.")


class GrantUsage(StatusModel):
    """What the grant was used for: the proxies' reports, aggregated by the controller."""

    last_used: AwareDatetime | None = Field(
        default=None,
        description="Last request the grant allowed, on any replica (never moves backwards).",
    )
    requests: int = Field(
        default=0, ge=0, description="Requests the grant allowed in `window`, all replicas."
    )
    window: str = Field(
        description='The counting window: the current UTC hour and the ones before it, "24h".'
    )
    rules: list[RuleUsage] = Field(default=[], description="Per rule, in `spec.rules` order.")
    complete: bool = Field(
        default=True,
        description="False when a replica's report lost data (bounds) or could not be read: "
        "counts are then a lower bound and the grant is never called Unused.",
    )
    replicas: int = Field(
        default=0, ge=0, description="Replica reports (live or stale Leases) counted."
    )


class RouteGrantStatus(StatusModel):
    """Whether a grant is accepted, enforced by every proxy replica, active, and used."""

    conditions: Conditions = []
    expires_at: AwareDatetime | None = Field(
        default=None, description="`spec.expiresAt`, echoed for `kubectl get` columns."
    )
    enforced_replicas: str | None = Field(
        default=None,
        description='Live proxy replicas serving a policy with this grant, out of all: "2/3".',
    )
    policy_version: str | None = Field(
        default=None, description="Version of the policy this grant was last compiled into."
    )
    usage: GrantUsage | None = Field(
        default=None, description="Requests the proxies allowed with this grant (docs/usage.md)."
    )
    observed_generation: int | None = Field(
        default=None, description="The `metadata.generation` this status describes."
    )


# ---------------------------------------------------------------------------------------------
# Revocation


class RevocationSpec(SpecModel):
    """Deny a credential before it expires. Exactly one selector."""

    issuer: ResourceName | None = Field(
        default=None, description="IdentityIssuer name; together with `subject`."
    )
    subject: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description="The `sub` claim; together with `issuer`."
    )
    token_id: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description="A token's `jti` claim."
    )
    service_account_uid: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = (
        Field(default=None, alias="serviceAccountUID", description="A service account's UID.")
    )
    until: AwareDatetime | None = Field(default=None, description="Absent: forever.")
    reason: Text | None = Field(default=None, description="Why; kept in the audit trail.")
    target: ServiceTarget | None = Field(
        default=None, description="Absent: every ProtectedService in the namespace."
    )

    cel_rules = (
        CelRule(
            rule="has(self.issuer) == has(self.subject)",
            message="issuer and subject must be set together",
            check=lambda r: (r.issuer is None) == (r.subject is None),
        ),
        CelRule(
            rule="(has(self.subject) ? 1 : 0) + (has(self.tokenId) ? 1 : 0)"
            " + (has(self.serviceAccountUID) ? 1 : 0) == 1",
            message="set exactly one selector: issuer and subject, tokenId, or serviceAccountUID",
            check=lambda r: [r.subject, r.token_id, r.service_account_uid].count(None) == 2,
        ),
    )


class RevocationStatus(StatusModel):
    """Whether the revocation was accepted."""

    conditions: Conditions = []
    observed_generation: int | None = Field(
        default=None, description="The `metadata.generation` this status describes."
    )


# ---------------------------------------------------------------------------------------------
# The resources


# What Kubernetes' own TypeMeta/ObjectMeta say, so `kubectl explain` reads as for built-in kinds.
_CONVENTIONS = "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md"
_API_VERSION_DESCRIPTION = (
    "APIVersion defines the versioned schema of this representation of an object. Servers should "
    "convert recognized schemas to the latest internal value, and may reject unrecognized values. "
    f"More info: {_CONVENTIONS}#resources"
)
_KIND_DESCRIPTION = (
    "Kind is a string value representing the REST resource this object represents. Servers may "
    "infer this from the endpoint the client submits requests to. Cannot be updated. In "
    f"CamelCase. More info: {_CONVENTIONS}#types-kinds"
)
_METADATA_DESCRIPTION = f"Standard object's metadata. More info: {_CONVENTIONS}#metadata"


class Resource(BaseModel):
    """Common shape of the four custom resources. Unknown top-level fields are ignored."""

    model_config = ConfigDict(**CAMEL_CASE, extra="ignore")

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAME: ClassVar[str]

    api_version: Literal["nhigate.io/v1alpha1"] = Field(
        default="nhigate.io/v1alpha1", description=_API_VERSION_DESCRIPTION
    )
    kind: str = Field(description=_KIND_DESCRIPTION)
    metadata: ObjectMeta = Field(description=_METADATA_DESCRIPTION)

    @property
    def name(self) -> str:
        """`metadata.name`."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """`metadata.namespace`."""
        return self.metadata.namespace

    @property
    def key(self) -> str:
        """`namespace/name`, the name the policy document and audit log use."""
        return f"{self.metadata.namespace}/{self.metadata.name}"

    def manifest(self) -> dict[str, Any]:
        """The object as it would be applied: camelCase, no status, no unset fields."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"status"})


_PS_NAME_RULE = CelRule(
    rule="self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') "
    "&& size(self.metadata.name) <= 55",
    message="name must be a DNS-1035 label of at most 55 characters "
    "(the proxy Service is named nhigate-<name>)",
    check=lambda ps: (
        re.fullmatch(_DNS1035_LABEL, ps.metadata.name) is not None and len(ps.metadata.name) <= 55
    ),
)


class IdentityIssuer(Resource):
    """Whom we trust to mint machine credentials."""

    KIND = kinds.IDENTITY_ISSUER.kind
    PLURAL = kinds.IDENTITY_ISSUER.plural
    SHORT_NAME = kinds.IDENTITY_ISSUER.short_name

    kind: Literal["IdentityIssuer"] = Field(default="IdentityIssuer", description=_KIND_DESCRIPTION)
    spec: IdentityIssuerSpec
    status: IdentityIssuerStatus = Field(default_factory=IdentityIssuerStatus)


class ProtectedService(Resource):
    """One backend Service put behind an nhigate proxy."""

    KIND = kinds.PROTECTED_SERVICE.kind
    PLURAL = kinds.PROTECTED_SERVICE.plural
    SHORT_NAME = kinds.PROTECTED_SERVICE.short_name

    kind: Literal["ProtectedService"] = Field(
        default="ProtectedService", description=_KIND_DESCRIPTION
    )
    spec: ProtectedServiceSpec
    status: ProtectedServiceStatus = Field(default_factory=ProtectedServiceStatus)

    @model_validator(mode="after")
    def _name_fits_generated_objects(self) -> ProtectedService:
        _PS_NAME_RULE.enforce(self)
        return self


class RouteGrant(Resource):
    """Who may do what, on which ProtectedService, until when."""

    KIND = kinds.ROUTE_GRANT.kind
    PLURAL = kinds.ROUTE_GRANT.plural
    SHORT_NAME = kinds.ROUTE_GRANT.short_name

    kind: Literal["RouteGrant"] = Field(default="RouteGrant", description=_KIND_DESCRIPTION)
    spec: RouteGrantSpec
    status: RouteGrantStatus = Field(default_factory=RouteGrantStatus)


class Revocation(Resource):
    """Deny a credential before it expires."""

    KIND = kinds.REVOCATION.kind
    PLURAL = kinds.REVOCATION.plural
    SHORT_NAME = kinds.REVOCATION.short_name

    kind: Literal["Revocation"] = Field(default="Revocation", description=_KIND_DESCRIPTION)
    spec: RevocationSpec
    status: RevocationStatus = Field(default_factory=RevocationStatus)


ROOT_RULES: dict[str, tuple[CelRule, ...]] = {"ProtectedService": (_PS_NAME_RULE,)}
"""CEL rules at the root of a CRD schema (they see `self.metadata.name`)."""

RESOURCE_TYPES: tuple[type[Resource], ...] = (
    IdentityIssuer,
    ProtectedService,
    RouteGrant,
    Revocation,
)
"""Every custom resource model, in dependency order."""

RESOURCE_BY_KIND: dict[str, type[Resource]] = {cls.KIND: cls for cls in RESOURCE_TYPES}
