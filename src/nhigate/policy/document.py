"""The compiled policy document: what the controller writes and the proxy loads.

One document per ProtectedService. It is plain JSON (stdlib `json`), carries
everything a proxy replica needs to authenticate and authorise requests for
that service, and is versioned by a hash of its content so that replicas can
report exactly which policy they serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from nhigate.policy.model import Grant, RateLimit, Revocation

DOCUMENT_API_VERSION = "nhigate.io/policy-v1"


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One IdentityIssuer, as the proxy needs it.

    Exactly one key source: `jwks` (inline JWK Set as a JSON-compatible dict),
    `jwks_uri`, or `kubernetes=True` (the cluster's service-account issuer; the
    proxy reads its JWKS from `jwks_uri` or inline `jwks` filled in by the
    controller).
    """

    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    max_token_lifetime_seconds: int
    clock_skew_seconds: int
    jwks: dict[str, object] | None = None
    jwks_uri: str | None = None
    kubernetes: bool = False
    refresh_interval_seconds: int = 300
    """How often a proxy re-fetches `jwks_uri` keys (the IdentityIssuer's `refreshInterval`)."""


@dataclass(frozen=True, slots=True)
class TenantMapping:
    """Where a request's tenant comes from; when both are set they must agree."""

    header: str | None = None
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    """A header the proxy injects upstream, its value read from a file (a mounted Secret key)."""

    header: str
    value_file: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class IdentityAssertion:
    """A short-lived JWT the proxy signs and sends upstream in `header`."""

    header: str = "X-Nhigate-Assertion"
    audience: str = ""
    ttl_seconds: int = 60


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The ProtectedService this document is for."""

    namespace: str
    name: str
    backend_service: str
    backend_port: int
    tenant: TenantMapping | None = None
    rate_limit: RateLimit | None = None
    upstream_credential: UpstreamCredential | None = None
    identity_assertion: IdentityAssertion | None = None
    mcp_endpoints: tuple[str, ...] = ()
    """Exact canonical paths that speak MCP (Streamable HTTP): only MCP rules reach them."""
    authorise_method_overrides: bool = False
    """The backend honours method-override headers/parameters: authorise them too (else 400)."""
    authorise_path_overrides: bool = False
    """The backend honours path-override headers (`X-Original-URL`): authorise them too."""
    websocket_paths: tuple[str, ...] = ()
    """Canonical path patterns (the grant grammar) where a WebSocket upgrade is relayed; an
    upgrade anywhere else is refused (docs/proxy.md#websocket)."""


@dataclass(frozen=True, slots=True)
class LiveServiceAccount:
    """A service account a grant names, as the controller last listed it."""

    namespace: str
    name: str
    uid: str | None
    """Its UID, or None: no service account of that name exists."""


@dataclass(frozen=True, slots=True)
class LiveIdentities:
    """Which service accounts and pods behind the service-account subjects exist (the
    controller's snapshot, docs/policy-document.md "Live identities").

    Every service account and pod created before `observed_at` (epoch seconds) that runs
    as one of `service_accounts` is listed; `retired` holds UIDs of service accounts and
    pods the controller saw deleted or replaced (kept for a while, then dropped: a token
    older than the snapshot whose UID is not live is refused anyway).
    """

    observed_at: float
    service_accounts: tuple[LiveServiceAccount, ...]
    pods: tuple[str, ...] = ()
    """UIDs of the live pods running as those service accounts."""
    retired: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, weakref_slot=True)
class PolicyDocument:
    """Everything one proxy replica enforces. `version` is derived from the content."""

    service: ServiceConfig
    issuers: tuple[IssuerConfig, ...]
    grants: tuple[Grant, ...]
    revocations: tuple[Revocation, ...]
    version: str
    identities: LiveIdentities | None = None
    """The live service accounts and pods (cluster mode); None: not checked (standalone)."""
