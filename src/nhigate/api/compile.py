"""Compile custom resources into the policy document one ProtectedService's proxies enforce.

Pure: the controller and standalone mode both call `build_policy_document` with
resources they have already read (and, for `kubernetes`/`jwksUri` issuers,
keys they have already fetched), so the same inputs always give the same
document and version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from nhigate.api.durations import duration_seconds
from nhigate.api.governance import judge_grant_policy
from nhigate.api.models import (
    DelegationSpec,
    IdentityIssuer,
    OverrideHandling,
    ProtectedService,
    RateLimitSpec,
    Revocation,
    RouteGrant,
    RouteRule,
    SubjectSpec,
)
from nhigate.policy import (
    Delegation,
    Grant,
    IdentityAssertion,
    IssuerConfig,
    LiveIdentities,
    McpRule,
    PolicyDocument,
    RateLimit,
    Rule,
    ServiceAccountSubject,
    ServiceConfig,
    SpiffeSubject,
    Subject,
    TenantMapping,
    TokenSubject,
    UpstreamCredential,
    make_document,
)
from nhigate.policy import Revocation as PolicyRevocation

UPSTREAM_CREDENTIAL_DIR = "/var/run/nhigate/upstream-credential"
"""Where the proxy Deployment mounts the upstream-credential Secret (one file per key)."""


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _rate_limit(spec: RateLimitSpec | None) -> RateLimit | None:
    if spec is None:
        return None
    return RateLimit(requests_per_second=spec.requests_per_second, burst=spec.burst)


def _delegation(spec: DelegationSpec | None) -> Delegation | None:
    if spec is None:
        return None
    return Delegation(tuple(spec.actors), spec.max_depth, spec.required)


def _subject(spec: SubjectSpec) -> Subject:
    if spec.service_account is not None:
        sa = spec.service_account
        return ServiceAccountSubject(sa.namespace, sa.name, _delegation(sa.delegation))
    if spec.token is not None:
        claims = tuple(sorted((spec.token.claims or {}).items()))
        return TokenSubject(
            spec.token.issuer, spec.token.subject, claims, _delegation(spec.token.delegation)
        )
    if spec.spiffe_id is not None:
        return SpiffeSubject(spec.spiffe_id)
    raise ValueError("subject sets none of serviceAccount, token, spiffeId")  # model forbids it


def _rule(spec: RouteRule) -> Rule:
    mcp = spec.mcp
    if mcp is not None:
        return Rule(
            methods=frozenset(),
            paths=(),
            mcp=McpRule(
                endpoints=tuple(mcp.endpoints or ()),
                tools=tuple(mcp.tools or ()),
                resources=tuple(mcp.resources or ()),
                prompts=tuple(mcp.prompts or ()),
            ),
        )
    return Rule(
        methods=frozenset(m.value for m in spec.methods or ()), paths=tuple(spec.paths or ())
    )


def compile_grant(grant: RouteGrant) -> Grant:
    """One RouteGrant as the policy engine sees it (name `namespace/name`)."""
    spec = grant.spec
    return Grant(
        name=grant.key,
        subjects=tuple(_subject(s) for s in spec.subjects),
        rules=tuple(_rule(r) for r in spec.rules),
        tenant=spec.tenant,
        not_before=_epoch(spec.not_before),
        expires_at=_epoch(spec.expires_at),
        rate_limit=_rate_limit(spec.rate_limit),
        reason=spec.reason or "",
    )


def compile_revocation(revocation: Revocation) -> PolicyRevocation:
    """One Revocation as the policy engine sees it (name `namespace/name`)."""
    spec = revocation.spec
    return PolicyRevocation(
        name=revocation.key,
        issuer=spec.issuer,
        subject=spec.subject,
        token_id=spec.token_id,
        service_account_uid=spec.service_account_uid,
        until=_epoch(spec.until),
    )


def compile_issuer(issuer: IdentityIssuer, fetched_jwks: Mapping[str, Any] | None) -> IssuerConfig:
    """One IdentityIssuer as the proxy needs it.

    Inline `jwks` are used as written. For `kubernetes` and `jwksUri` issuers,
    `fetched_jwks` (keys the controller fetched) are put inline; a `jwksUri`
    issuer without fetched keys keeps its URI and the proxy fetches it itself.
    A `kubernetes` issuer without fetched keys has none: its tokens are denied.
    """
    spec = issuer.spec
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    if spec.jwks is not None:
        jwks = spec.jwks.model_dump(mode="json", exclude_none=True)
    elif fetched_jwks is not None:
        jwks = dict(fetched_jwks)
    elif spec.jwks_uri is not None:
        jwks_uri = spec.jwks_uri
    return IssuerConfig(
        name=issuer.name,
        issuer=spec.issuer,
        audiences=tuple(spec.audiences),
        algorithms=tuple(a.value for a in spec.algorithms),
        max_token_lifetime_seconds=duration_seconds(spec.max_token_lifetime),
        clock_skew_seconds=duration_seconds(spec.clock_skew),
        refresh_interval_seconds=duration_seconds(spec.refresh_interval),
        jwks=jwks,
        jwks_uri=jwks_uri,
        kubernetes=spec.kubernetes is not None,
    )


def compile_service(service: ProtectedService) -> ServiceConfig:
    """The ProtectedService part of the document."""
    spec = service.spec
    tenant = None
    if spec.tenant is not None:
        tenant = TenantMapping(header=spec.tenant.header, claim=spec.tenant.claim)
    credential = None
    if spec.upstream_credential is not None:
        cred = spec.upstream_credential
        credential = UpstreamCredential(
            header=cred.header,
            value_file=f"{UPSTREAM_CREDENTIAL_DIR}/{cred.key}",
            prefix=cred.prefix,
        )
    assertion = None
    if spec.identity_assertion is not None and spec.identity_assertion.enabled:
        ia = spec.identity_assertion
        assertion = IdentityAssertion(
            header=ia.header,
            audience=ia.audience or service.key,
            ttl_seconds=duration_seconds(ia.ttl),
        )
    overrides = spec.overrides
    return ServiceConfig(
        namespace=service.namespace,
        name=service.name,
        backend_service=spec.backend.service,
        backend_port=spec.backend.port,
        tenant=tenant,
        rate_limit=_rate_limit(spec.rate_limit),
        upstream_credential=credential,
        identity_assertion=assertion,
        mcp_endpoints=tuple(spec.mcp.endpoints) if spec.mcp is not None else (),
        authorise_method_overrides=overrides is not None
        and overrides.method is OverrideHandling.AUTHORIZE,
        authorise_path_overrides=overrides is not None
        and overrides.path is OverrideHandling.AUTHORIZE,
        websocket_paths=tuple(spec.websocket.paths) if spec.websocket is not None else (),
    )


def undeclared_mcp_endpoints(grant: RouteGrant, service: ProtectedService) -> list[str]:
    """MCP endpoints the grant's rules name that the service does not declare (those rules
    allow nothing there; the controller reports them on the grant)."""
    declared = set(service.spec.mcp.endpoints) if service.spec.mcp is not None else set()
    missing: list[str] = []
    for rule in grant.spec.rules:
        if rule.mcp is None:
            continue
        named = rule.mcp.endpoints or ([] if declared else ["(any)"])
        missing.extend(e for e in named if e not in declared and e not in missing)
    return missing


def grant_applies(grant: RouteGrant, service: ProtectedService) -> bool:
    """True when the grant targets this service (same namespace, by name)."""
    return (
        grant.namespace == service.namespace and grant.spec.target.protected_service == service.name
    )


def revocation_applies(revocation: Revocation, service: ProtectedService) -> bool:
    """True when the revocation covers this service (no target = every service in the namespace)."""
    if revocation.namespace != service.namespace:
        return False
    target = revocation.spec.target
    return target is None or target.protected_service == service.name


def missing_issuers(service: ProtectedService, issuers: Sequence[IdentityIssuer]) -> list[str]:
    """Names in `spec.issuers` with no IdentityIssuer in the service's namespace."""
    present = {i.name for i in issuers if i.namespace == service.namespace}
    return [name for name in service.spec.issuers if name not in present]


def build_policy_document(
    service: ProtectedService,
    issuers: Sequence[IdentityIssuer],
    grants: Sequence[RouteGrant],
    revocations: Sequence[Revocation],
    *,
    now: datetime,
    issuer_jwks: Mapping[str, Mapping[str, Any]] | None = None,
    drop_expired: bool = True,
    identities: LiveIdentities | None = None,
) -> PolicyDocument:
    """The policy document for `service`.

    Keeps the issuers the service names (same namespace; missing ones are
    skipped, see `missing_issuers`), the grants that target it, and the
    revocations that cover it. Grants already expired at `now` and revocations
    past their `until` are dropped (unless `drop_expired=False`, which
    `nhigate explain` uses to say *why* an expired grant no longer allows);
    not-yet-valid grants are kept, because the proxy checks `notBefore` on its
    own clock. Grants that break the service's `spec.grantPolicy` are never compiled
    (`judge_grant_policy`). `issuer_jwks` maps issuer names to fetched JWK Sets; `identities`
    is the controller's snapshot of the live service accounts and pods (None in standalone
    mode).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    at = now.astimezone(UTC).timestamp()
    fetched = issuer_jwks or {}
    by_name = {i.name: i for i in issuers if i.namespace == service.namespace}
    issuer_configs = [
        compile_issuer(by_name[name], fetched.get(name))
        for name in service.spec.issuers
        if name in by_name
    ]
    compiled_grants = [
        compile_grant(g)
        for g in grants
        if grant_applies(g, service)
        and judge_grant_policy(g, service, issuers, now=now) is None  # fail closed
    ]
    compiled_revocations = [
        compile_revocation(r) for r in revocations if revocation_applies(r, service)
    ]
    if drop_expired:
        compiled_grants = [g for g in compiled_grants if g.expires_at is None or g.expires_at > at]
        compiled_revocations = [r for r in compiled_revocations if r.until is None or r.until > at]
    return make_document(
        compile_service(service),
        issuer_configs,
        compiled_grants,
        compiled_revocations,
        identities,
    )
