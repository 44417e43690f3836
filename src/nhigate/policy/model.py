"""The pure model of identities, grants, revocations and decisions.

Everything here is immutable and stdlib-only: the controller compiles these
from custom resources, the proxy builds `Facts` per request, and `decide()`
joins the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class IdentityKind(StrEnum):
    """How the caller proved who it is."""

    SERVICE_ACCOUNT = "serviceAccount"
    """A Kubernetes service-account token verified against a `kubernetes` issuer."""
    JWT = "jwt"
    """A bearer JWT verified against an IdentityIssuer's JWKS."""
    SPIFFE = "spiffe"
    """An mTLS client certificate whose URI SAN is a SPIFFE ID."""


class Reason(StrEnum):
    """The closed set of reasons a request is allowed or denied.

    The audit log, metrics and `nhigate explain` all use these values; adding
    one is an API change.
    """

    ALLOWED = "allowed"
    # authorisation (decide)
    NO_MATCHING_GRANT = "no_matching_grant"
    GRANT_NOT_YET_VALID = "grant_not_yet_valid"
    GRANT_EXPIRED = "grant_expired"
    TENANT_MISMATCH = "tenant_mismatch"
    REVOKED = "revoked"
    IDENTITY_RETIRED = "identity_retired"
    """The token's service account or pod was deleted or replaced (a new UID under the
    same name): the API server would no longer accept the token either."""
    PATH_REJECTED = "path_rejected"
    # delegation chains (RFC 8693 `act`, docs/mcp.md)
    DELEGATION_NOT_ALLOWED = "delegation_not_allowed"
    """The token carries an actor chain and the matching grant subject accepts none."""
    DELEGATION_TOO_DEEP = "delegation_too_deep"
    """The actor chain is longer than the grant subject's `maxDepth`."""
    ACTOR_NOT_ALLOWED = "actor_not_allowed"
    """An actor in the chain is not one the grant subject names."""
    ACTOR_REQUIRED = "actor_required"
    """The grant subject requires an actor and the token carries none."""
    # MCP endpoints (docs/mcp.md)
    MCP_METHOD_NOT_ALLOWED = "mcp_method_not_allowed"
    """A JSON-RPC method the proxy does not know how to authorise (denied, fail closed)."""
    MCP_SESSION_MISMATCH = "mcp_session_mismatch"
    """The `Mcp-Session-Id` was issued to another identity."""
    MCP_REJECTED = "mcp_rejected"
    """The request is not a well-formed, strictly parsed JSON-RPC request for an MCP endpoint."""
    # authentication (proxy)
    CREDENTIAL_MISSING = "credential_missing"
    TOKEN_MALFORMED = "token_malformed"  # noqa: S105 (a reason, not a secret)
    TOKEN_INVALID = "token_invalid"  # noqa: S105 (a reason, not a secret)
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 (a reason, not a secret)
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # noqa: S105 (a reason, not a secret)
    TOKEN_LIFETIME_EXCEEDED = "token_lifetime_exceeded"  # noqa: S105 (a reason, not a secret)
    UNKNOWN_ISSUER = "unknown_issuer"
    UNKNOWN_KEY = "unknown_key"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    AUDIENCE_MISMATCH = "audience_mismatch"
    # request / runtime (proxy)
    RATE_LIMITED = "rate_limited"
    REQUEST_TIMEOUT = "request_timeout"
    """The request head did not arrive within the head timeout (408, or closed if silent)."""
    CONNECTION_LIMIT = "connection_limit"
    """The replica already holds its bound of open client connections (503, then closed)."""
    REQUEST_REJECTED = "request_rejected"
    OVERRIDE_REJECTED = "override_rejected"
    UPGRADE_REJECTED = "upgrade_rejected"
    """An `Upgrade` request the proxy does not relay: not a well-formed WebSocket handshake
    (RFC 6455 section 4.1) to a path the service declares (docs/proxy.md#websocket)."""
    BODY_TOO_LARGE = "body_too_large"
    NO_POLICY = "no_policy"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class ServiceAccountRef:
    """A Kubernetes service account, as identified by a verified token."""

    namespace: str
    name: str
    uid: str | None = None
    pod_uid: str | None = None
    """The pod a pod-bound token is bound to (`kubernetes.io.pod.uid`), else None."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller.

    `issuer` is the name of the IdentityIssuer resource that verified the
    credential ("" for SPIFFE identities); `subject` is the token's `sub`
    claim or the SPIFFE ID.
    """

    kind: IdentityKind
    issuer: str
    subject: str
    claims: Mapping[str, object] = field(default_factory=dict)
    service_account: ServiceAccountRef | None = None
    spiffe_id: str | None = None
    token_id: str | None = None
    """The token's `jti`, when present, for revocation by token."""
    actors: tuple[str, ...] = ()
    """The RFC 8693 actor chain (`act.sub`, nested `act.act.sub`, ...), current actor first;
    empty for a token used by its own subject."""
    issued_at: float | None = None
    """The token's `iat` (epoch seconds), when the credential is a token."""


SERVICE_ACCOUNT_SUBJECT_PREFIX = "system:serviceaccount:"
"""How a Kubernetes service-account token spells its `sub`: `system:serviceaccount:NS:NAME`."""


def service_account_subject(namespace: str, name: str) -> str:
    """The `sub` of a token for the service account `namespace`/`name`."""
    return f"{SERVICE_ACCOUNT_SUBJECT_PREFIX}{namespace}:{name}"


def service_account_of_subject(subject: str) -> tuple[str, str] | None:
    """(namespace, name) of a `system:serviceaccount:NS:NAME` subject; None for any other."""
    if not subject.startswith(SERVICE_ACCOUNT_SUBJECT_PREFIX):
        return None
    namespace, sep, name = subject[len(SERVICE_ACCOUNT_SUBJECT_PREFIX) :].partition(":")
    return (namespace, name) if sep and namespace and name and ":" not in name else None


def token_identity(
    issuer: str,
    subject: str,
    claims: Mapping[str, object],
    *,
    service_account: ServiceAccountRef | None = None,
    token_id: str | None = None,
    actors: tuple[str, ...] = (),
    issued_at: float | None = None,
) -> Identity:
    """The Identity a bearer token's claims name: a service account's when the issuer is a
    `kubernetes` one and named it, else a plain JWT's."""
    return Identity(
        kind=IdentityKind.JWT if service_account is None else IdentityKind.SERVICE_ACCOUNT,
        issuer=issuer,
        subject=subject,
        claims=claims,
        service_account=service_account,
        token_id=token_id,
        actors=actors,
        issued_at=issued_at,
    )


@dataclass(frozen=True, slots=True)
class Delegation:
    """Which actor chains a grant subject accepts (RFC 8693 `act`; docs/mcp.md).

    A subject without a `Delegation` matches only tokens without an actor chain.
    With one, every actor in the chain must match one of `actors` (name patterns:
    `*` matches any run of characters), the chain may be at most `max_depth`
    long, and when `required` a token without an actor does not match.
    """

    actors: tuple[str, ...]
    max_depth: int = 1
    required: bool = False


@dataclass(frozen=True, slots=True)
class ServiceAccountSubject:
    """Grant subject: a Kubernetes service account (via a `kubernetes` issuer)."""

    namespace: str
    name: str
    delegation: Delegation | None = None


@dataclass(frozen=True, slots=True)
class TokenSubject:
    """Grant subject: tokens from one issuer, by `sub` and/or exact claim values.

    `subject=None` means any subject from that issuer whose claims match; at
    least one of `subject` or `claims` is always set (the CRD enforces it).
    """

    issuer: str
    subject: str | None = None
    claims: tuple[tuple[str, str], ...] = ()
    delegation: Delegation | None = None


@dataclass(frozen=True, slots=True)
class SpiffeSubject:
    """Grant subject: an exact SPIFFE ID from an mTLS client certificate."""

    spiffe_id: str


Subject = ServiceAccountSubject | TokenSubject | SpiffeSubject


@dataclass(frozen=True, slots=True)
class McpRule:
    """MCP tools, resources and prompts on MCP endpoints of the service (docs/mcp.md).

    `endpoints` are exact paths the service declares as MCP endpoints; empty means
    every one it declares. Entries are name patterns (tool and prompt names,
    resource URIs) where `*` matches any run of characters and everything else is
    literal and case-sensitive.
    """

    endpoints: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """Methods x path patterns, or an MCP rule. `methods` are upper-case; `"*"` means any.

    Path patterns follow the grammar in docs/path-grammar.md: exact
    (`/v1/items`), one-segment wildcard (`/v1/items/*/history`) and a trailing
    subtree (`/v1/items/**`, which also matches `/v1/items`). An MCP rule has no
    methods and no paths (it never allows a plain HTTP request) and sets `mcp`.
    """

    methods: frozenset[str]
    paths: tuple[str, ...]
    mcp: McpRule | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket: `requests_per_second` refill, `burst` capacity (per proxy replica)."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Grant:
    """One RouteGrant, compiled. `name` is `namespace/name`; times are epoch seconds."""

    name: str
    subjects: tuple[Subject, ...]
    rules: tuple[Rule, ...]
    tenant: str | None = None
    not_before: float | None = None
    expires_at: float | None = None
    rate_limit: RateLimit | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Revocation:
    """Deny matching credentials until `until` (epoch seconds; None = forever).

    Exactly one selector is set: `issuer`+`subject`, `token_id` (jti), or
    `service_account_uid`.
    """

    name: str
    issuer: str | None = None
    subject: str | None = None
    token_id: str | None = None
    service_account_uid: str | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the proxy knows about one request when it asks for a decision.

    `path` must already be the output of `normalise_path()`; it is the path
    that will be forwarded. `tenant` is the tenant the request resolved to, or
    None when the service has no tenant mapping.
    """

    identity: Identity
    method: str
    path: str
    now: float
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of `decide()`.

    `grant` names the grant that allowed the request; on a denial for
    `grant_expired`, `grant_not_yet_valid` or `tenant_mismatch` it names the
    candidate grant behind that reason (None otherwise).
    """

    allowed: bool
    reason: Reason
    grant: str | None = None
    rate_limit: RateLimit | None = None
