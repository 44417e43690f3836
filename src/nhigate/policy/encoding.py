"""Canonical JSON encoding of the policy document, and its content-hash version.

`make_document` puts everything in canonical order and computes `version`;
`encode_document` writes canonical JSON (sorted keys, no spaces, ASCII);
`decode_document` validates strictly and checks that `version` matches the
content. The format is specified in docs/policy-document.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import weakref
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, NoReturn

from nhigate.policy.allocation import gc_paused
from nhigate.policy.document import (
    DOCUMENT_API_VERSION,
    IdentityAssertion,
    IssuerConfig,
    LiveIdentities,
    LiveServiceAccount,
    PolicyDocument,
    ServiceConfig,
    TenantMapping,
    UpstreamCredential,
)
from nhigate.policy.model import (
    Delegation,
    Grant,
    McpRule,
    RateLimit,
    Revocation,
    Rule,
    ServiceAccountSubject,
    SpiffeSubject,
    Subject,
    TokenSubject,
)
from nhigate.policy.names import is_mcp_endpoint_path, name_pattern_problem
from nhigate.policy.paths import PathPattern
from nhigate.policy.strict_json import StrictJsonError, reject_constant, reject_duplicate_keys

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{6}))?Z")
_VERSION_RE = re.compile(r"sha256:[0-9a-f]{16}")
_METHOD_RE = re.compile(r"[A-Z][A-Z0-9-]*")


class PolicyDocumentError(ValueError):
    """A policy document is malformed; the message names the offending field."""


def _fail(where: str, message: str) -> NoReturn:
    raise PolicyDocumentError(f"{where.lstrip('.') or 'document'}: {message}")


# --- times ----------------------------------------------------------------------------------


def _micros(t: float) -> int:
    return round(t * 1_000_000)


def canonical_time(t: float) -> float:
    """Round an epoch time to the microsecond precision the document stores."""
    return _micros(t) / 1_000_000


@lru_cache(maxsize=16384)
def format_time(t: float) -> str:
    """Epoch seconds -> RFC 3339 UTC (``2026-01-02T03:04:05Z``, or ``...05.250000Z``)."""
    # Cached: documents repeat expiry times, and encode/decode/version all format them.
    seconds, micros = divmod(_micros(t), 1_000_000)
    m = _EPOCH + timedelta(seconds=seconds)
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


@lru_cache(maxsize=16384)
def parse_time(text: str) -> float:
    """RFC 3339 UTC as written by `format_time` -> epoch seconds; ValueError otherwise."""
    match = _TIME_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 UTC time like 2026-01-02T03:04:05Z")
    try:
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid time: {exc}") from None
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    fraction = match.group(7)
    micros = int(fraction or "0")
    if fraction is not None and micros == 0:
        raise ValueError(f"{text!r}: write whole seconds without a fraction")
    return (seconds * 1_000_000 + micros) / 1_000_000


# --- model -> JSON --------------------------------------------------------------------------


def _opt_time(t: float | None) -> str | None:
    return None if t is None else format_time(t)


def _rate_limit_json(rl: RateLimit | None) -> dict[str, Any] | None:
    if rl is None:
        return None
    return {"requestsPerSecond": float(rl.requests_per_second), "burst": rl.burst}


def _delegation_json(body: dict[str, Any], delegation: Delegation | None) -> dict[str, Any]:
    # Absent unless set: documents without delegation keep the bytes (and version) they had.
    if delegation is not None:
        body["delegation"] = {
            "actors": list(delegation.actors),
            "maxDepth": delegation.max_depth,
            "required": delegation.required,
        }
    return body


def _subject_json(subject: Subject) -> dict[str, Any]:
    if isinstance(subject, ServiceAccountSubject):
        body: dict[str, Any] = {"namespace": subject.namespace, "name": subject.name}
        return {"serviceAccount": _delegation_json(body, subject.delegation)}
    if isinstance(subject, TokenSubject):
        body = {"issuer": subject.issuer, "subject": subject.subject}
        body["claims"] = dict(subject.claims)
        return {"token": _delegation_json(body, subject.delegation)}
    return {"spiffeId": subject.spiffe_id}


def _rule_json(rule: Rule) -> dict[str, Any]:
    mcp = rule.mcp
    if mcp is None:
        return {"methods": sorted(rule.methods), "paths": list(rule.paths)}
    return {
        "mcp": {
            "endpoints": list(mcp.endpoints),
            "tools": list(mcp.tools),
            "resources": list(mcp.resources),
            "prompts": list(mcp.prompts),
        }
    }


def _grant_json(grant: Grant) -> dict[str, Any]:
    return {
        "name": grant.name,
        "subjects": [_subject_json(s) for s in grant.subjects],
        "rules": [_rule_json(r) for r in grant.rules],
        "tenant": grant.tenant,
        "notBefore": _opt_time(grant.not_before),
        "expiresAt": _opt_time(grant.expires_at),
        "rateLimit": _rate_limit_json(grant.rate_limit),
        "reason": grant.reason,
    }


def _revocation_json(rev: Revocation) -> dict[str, Any]:
    return {
        "name": rev.name,
        "issuer": rev.issuer,
        "subject": rev.subject,
        "tokenId": rev.token_id,
        "serviceAccountUid": rev.service_account_uid,
        "until": _opt_time(rev.until),
    }


def _issuer_json(iss: IssuerConfig) -> dict[str, Any]:
    return {
        "name": iss.name,
        "issuer": iss.issuer,
        "audiences": list(iss.audiences),
        "algorithms": list(iss.algorithms),
        "maxTokenLifetimeSeconds": iss.max_token_lifetime_seconds,
        "clockSkewSeconds": iss.clock_skew_seconds,
        "jwks": iss.jwks,
        "jwksUri": iss.jwks_uri,
        "kubernetes": iss.kubernetes,
        "refreshIntervalSeconds": iss.refresh_interval_seconds,
    }


def _service_json(svc: ServiceConfig) -> dict[str, Any]:
    tenant = svc.tenant
    cred = svc.upstream_credential
    assertion = svc.identity_assertion
    body = {
        "namespace": svc.namespace,
        "name": svc.name,
        "backendService": svc.backend_service,
        "backendPort": svc.backend_port,
        "tenant": None if tenant is None else {"header": tenant.header, "claim": tenant.claim},
        "rateLimit": _rate_limit_json(svc.rate_limit),
        "upstreamCredential": None
        if cred is None
        else {"header": cred.header, "valueFile": cred.value_file, "prefix": cred.prefix},
        "identityAssertion": None
        if assertion is None
        else {
            "header": assertion.header,
            "audience": assertion.audience,
            "ttlSeconds": assertion.ttl_seconds,
        },
    }
    if svc.mcp_endpoints:  # absent unless set, like `delegation`
        body["mcpEndpoints"] = list(svc.mcp_endpoints)
    if svc.authorise_method_overrides or svc.authorise_path_overrides:  # absent unless set
        body["authorizeOverrides"] = {
            "method": svc.authorise_method_overrides,
            "path": svc.authorise_path_overrides,
        }
    if svc.websocket_paths:  # absent unless set
        body["websocketPaths"] = list(svc.websocket_paths)
    return body


def _identities_json(live: LiveIdentities) -> dict[str, Any]:
    return {
        "observedAt": format_time(live.observed_at),
        "serviceAccounts": [
            {"namespace": a.namespace, "name": a.name, "uid": a.uid} for a in live.service_accounts
        ],
        "pods": list(live.pods),
        "retired": list(live.retired),
    }


def _content_json(
    service: ServiceConfig,
    issuers: Iterable[IssuerConfig],
    grants: Iterable[Grant],
    revocations: Iterable[Revocation],
    identities: LiveIdentities | None = None,
) -> dict[str, Any]:
    body = {
        "apiVersion": DOCUMENT_API_VERSION,
        "service": _service_json(service),
        "issuers": [_issuer_json(i) for i in issuers],
        "grants": [_grant_json(g) for g in grants],
        "revocations": [_revocation_json(r) for r in revocations],
    }
    if identities is not None:  # absent unless set (standalone documents have none)
        body["identities"] = _identities_json(identities)
    return body


def _canonical_bytes(obj: object) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PolicyDocumentError(f"document is not JSON-serialisable: {exc}") from None
    return text.encode("ascii")


# --- JSON -> model (strict) -----------------------------------------------------------------


_KEYSETS: dict[tuple[str, ...], frozenset[str]] = {}


def _obj(value: object, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    keyset = _KEYSETS.get(keys)
    if keyset is None:
        keyset = _KEYSETS[keys] = frozenset(keys)
    # Fast path: exactly the expected keys (a set comparison in C); errors take the slow path.
    if type(value) is dict and value.keys() == keyset:
        return value
    if not isinstance(value, dict):
        _fail(where, f"expected an object, got {_type_name(value)}")
    missing = [k for k in keys if k not in value]
    if missing:
        _fail(f"{where}.{missing[0]}", "missing field")
    unknown = sorted(k for k in value if k not in keys)
    if unknown:
        _fail(f"{where}.{unknown[0]}", "unknown field")
    return value


def _obj_optional(
    value: object, where: str, keys: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    """`_obj` where the `optional` keys may also appear (absent means unset)."""
    if not isinstance(value, dict):
        _fail(where, f"expected an object, got {_type_name(value)}")
    present = tuple(k for k in optional if k in value)
    return _obj(value, where, keys + present)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _str(obj: Mapping[str, Any], key: str, where: str, *, empty_ok: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        _fail(f"{where}.{key}", f"expected a string, got {_type_name(value)}")
    if not value and not empty_ok:
        _fail(f"{where}.{key}", "must not be empty")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if obj[key] is None else _str(obj, key, where)


def _int(obj: Mapping[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{where}.{key}", f"expected an integer, got {_type_name(value)}")
    if not low <= value <= high:
        _fail(f"{where}.{key}", f"must be between {low} and {high}, got {value}")
    return value


def _bool(obj: Mapping[str, Any], key: str, where: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        _fail(f"{where}.{key}", f"expected a boolean, got {_type_name(value)}")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str, *, empty_ok: bool = True) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        _fail(f"{where}.{key}", f"expected an array, got {_type_name(value)}")
    if not value and not empty_ok:
        _fail(f"{where}.{key}", "must not be empty")
    return value


def _str_list(obj: Mapping[str, Any], key: str, where: str, *, empty_ok: bool) -> tuple[str, ...]:
    items = _list(obj, key, where, empty_ok=empty_ok)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            _fail(f"{where}.{key}[{i}]", "expected a non-empty string")
    return tuple(items)


def _opt_time_field(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    value = obj[key]
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(f"{where}.{key}", f"expected an RFC 3339 time string, got {_type_name(value)}")
    try:
        return parse_time(value)
    except ValueError as exc:
        _fail(f"{where}.{key}", str(exc))


def _rate_limit(value: object, where: str) -> RateLimit | None:
    if value is None:
        return None
    obj = _obj(value, where, ("requestsPerSecond", "burst"))
    rps = obj["requestsPerSecond"]
    if isinstance(rps, bool) or not isinstance(rps, int | float) or not math.isfinite(rps):
        _fail(f"{where}.requestsPerSecond", f"expected a number, got {_type_name(rps)}")
    if rps <= 0:
        _fail(f"{where}.requestsPerSecond", "must be greater than 0")
    return RateLimit(requests_per_second=float(rps), burst=_int(obj, "burst", where, 1, 2**31))


def _subject(value: object, where: str) -> Subject:
    if not isinstance(value, dict) or len(value) != 1:
        _fail(where, "expected an object with exactly one of serviceAccount, token, spiffeId")
    ((kind, body),) = value.items()
    if kind == "serviceAccount":
        w = f"{where}.serviceAccount"
        obj = _obj_optional(body, w, ("namespace", "name"), ("delegation",))
        return ServiceAccountSubject(
            _str(obj, "namespace", w), _str(obj, "name", w), _delegation(obj, w)
        )
    if kind == "token":
        w = f"{where}.token"
        obj = _obj_optional(body, w, ("issuer", "subject", "claims"), ("delegation",))
        claims_obj = obj["claims"]
        if not isinstance(claims_obj, dict):
            _fail(f"{w}.claims", f"expected an object, got {_type_name(claims_obj)}")
        for name, claim in claims_obj.items():
            if not name or not isinstance(claim, str):
                _fail(f"{w}.claims.{name}", "expected a non-empty name with a string value")
        subject = _opt_str(obj, "subject", w)
        if subject is None and not claims_obj:
            _fail(w, "set subject, claims, or both")
        return TokenSubject(
            issuer=_str(obj, "issuer", w),
            subject=subject,
            claims=tuple(sorted(claims_obj.items())),
            delegation=_delegation(obj, w),
        )
    if kind == "spiffeId":
        if not isinstance(body, str) or not body.startswith("spiffe://") or len(body) <= 9:
            _fail(f"{where}.spiffeId", "expected a SPIFFE ID like spiffe://trust.domain/path")
        return SpiffeSubject(body)
    _fail(f"{where}.{kind}", "unknown subject kind (serviceAccount, token, spiffeId)")


MAX_DELEGATION_DEPTH: Final = 8
"""Longest actor chain a grant subject may accept (`maxDepth`)."""


def _delegation(obj: Mapping[str, Any], where: str) -> Delegation | None:
    if "delegation" not in obj:
        return None
    w = f"{where}.delegation"
    d = _obj(obj["delegation"], w, ("actors", "maxDepth", "required"))
    actors = _str_list(d, "actors", w, empty_ok=False)
    for i, actor in enumerate(actors):
        problem = name_pattern_problem(actor)
        if problem is not None:
            _fail(f"{w}.actors[{i}]", problem)
    return Delegation(
        actors=actors,
        max_depth=_int(d, "maxDepth", w, 1, MAX_DELEGATION_DEPTH),
        required=_bool(d, "required", w),
    )


def _mcp_rule(value: object, where: str) -> McpRule:
    obj = _obj(value, where, ("endpoints", "tools", "resources", "prompts"))
    endpoints = _str_list(obj, "endpoints", where, empty_ok=True)
    for i, endpoint in enumerate(endpoints):
        if not is_mcp_endpoint_path(endpoint):
            _fail(f"{where}.endpoints[{i}]", f"{endpoint!r} is not an MCP endpoint path")
    lists = {}
    for key in ("tools", "resources", "prompts"):
        items = _str_list(obj, key, where, empty_ok=True)
        for i, item in enumerate(items):
            problem = name_pattern_problem(item, uri=key == "resources")
            if problem is not None:
                _fail(f"{where}.{key}[{i}]", problem)
        lists[key] = items
    if not (lists["tools"] or lists["resources"] or lists["prompts"]):
        _fail(where, "name at least one tool, resource or prompt")
    return McpRule(endpoints, lists["tools"], lists["resources"], lists["prompts"])


@lru_cache(maxsize=1024)
def _is_method(method: str) -> bool:
    return method == "*" or _METHOD_RE.fullmatch(method) is not None


_RULE_KEYS: Final = ("methods", "paths")


def _rule(value: object, where: str) -> Rule:
    if isinstance(value, dict) and "mcp" in value:
        obj = _obj(value, where, ("mcp",))
        return Rule(methods=frozenset(), paths=(), mcp=_mcp_rule(obj["mcp"], f"{where}.mcp"))
    obj = _obj(value, where, _RULE_KEYS)
    methods = _str_list(obj, "methods", where, empty_ok=False)
    for i, method in enumerate(methods):
        if not _is_method(method):
            _fail(f"{where}.methods[{i}]", f"{method!r} is not an upper-case HTTP method or '*'")
    paths = _str_list(obj, "paths", where, empty_ok=False)
    for i, path in enumerate(paths):
        try:
            PathPattern.compile(path)  # cached by pattern text
        except ValueError as exc:
            _fail(f"{where}.paths[{i}]", str(exc))
    return Rule(methods=frozenset(methods), paths=paths)


_GRANT_KEYS: Final = (
    "name",
    "subjects",
    "rules",
    "tenant",
    "notBefore",
    "expiresAt",
    "rateLimit",
    "reason",
)
_GRANT_KEYSET: Final = frozenset(_GRANT_KEYS)
_RULE_KEYSET: Final = frozenset(_RULE_KEYS)
_TOKEN_KEYSET: Final = frozenset(("issuer", "subject", "claims"))
_SERVICE_ACCOUNT_KEYSET: Final = frozenset(("namespace", "name"))


@lru_cache(maxsize=65536)
def _is_pattern(pattern: str) -> bool:
    try:
        PathPattern.compile(pattern)
    except ValueError:
        return False
    return True


def _opt_time_or_fail(value: object) -> float | None:
    if value is None:
        return None
    if type(value) is not str:
        raise TypeError("not a time")
    return parse_time(value)


def _fast_subject(value: object) -> Subject | None:
    """`_subject` for the valid case, without building error locations; None when in doubt."""
    if type(value) is not dict or len(value) != 1:
        return None
    ((kind, body),) = value.items()
    if type(body) is str:
        if kind == "spiffeId" and body.startswith("spiffe://") and len(body) > 9:
            return SpiffeSubject(body)
        return None
    if type(body) is not dict:
        return None
    if kind == "token":
        if body.keys() != _TOKEN_KEYSET:
            return None
        issuer, subject, claims = body["issuer"], body["subject"], body["claims"]
        if type(issuer) is not str or not issuer or type(claims) is not dict:
            return None
        if subject is not None and (type(subject) is not str or not subject):
            return None
        if not claims:
            return None if subject is None else TokenSubject(issuer, subject, ())
        for name, claim in claims.items():
            if not name or type(claim) is not str:
                return None
        return TokenSubject(issuer, subject, tuple(sorted(claims.items())))
    if kind == "serviceAccount" and body.keys() == _SERVICE_ACCOUNT_KEYSET:
        namespace, name = body["namespace"], body["name"]
        if type(namespace) is str and namespace and type(name) is str and name:
            return ServiceAccountSubject(namespace, name)
    return None


def _fast_rule(value: object) -> Rule | None:
    """`_rule` for the valid case, without building error locations; None when in doubt."""
    if type(value) is not dict or value.keys() != _RULE_KEYSET:
        return None
    methods, paths = value["methods"], value["paths"]
    if type(methods) is not list or not methods or type(paths) is not list or not paths:
        return None
    for method in methods:
        if type(method) is not str or not _is_method(method):
            return None
    for path in paths:
        if type(path) is not str or not _is_pattern(path):
            return None
    return Rule(methods=frozenset(methods), paths=tuple(paths))


def _fast_grant(value: object) -> Grant | None:
    """`_grant` for the valid case, without building error locations; None when in doubt.

    It accepts a subset of what `_grant` accepts and builds the same `Grant` (a
    differential test holds it to that); anything it is unsure of goes to `_grant`,
    which names the offending field.
    """
    if type(value) is not dict or value.keys() != _GRANT_KEYSET:
        return None
    name, tenant, reason = value["name"], value["tenant"], value["reason"]
    if type(name) is not str or not name or type(reason) is not str:
        return None
    if tenant is not None and (type(tenant) is not str or not tenant):
        return None
    subjects_json, rules_json = value["subjects"], value["rules"]
    if type(subjects_json) is not list or not subjects_json:
        return None
    if type(rules_json) is not list or not rules_json:
        return None
    try:
        not_before = _opt_time_or_fail(value["notBefore"])
        expires_at = _opt_time_or_fail(value["expiresAt"])
        rate_limit = _rate_limit(value["rateLimit"], "rateLimit")
    except (ValueError, TypeError):  # PolicyDocumentError is a ValueError
        return None
    if not_before is not None and expires_at is not None and expires_at <= not_before:
        return None
    subjects = []
    for item in subjects_json:
        subject = _fast_subject(item)
        if subject is None:
            return None
        subjects.append(subject)
    rules = []
    for item in rules_json:
        rule = _fast_rule(item)
        if rule is None:
            return None
        rules.append(rule)
    return Grant(
        name, tuple(subjects), tuple(rules), tenant, not_before, expires_at, rate_limit, reason
    )


def _grant(value: object, where: str) -> Grant:
    obj = _obj(value, where, _GRANT_KEYS)
    subjects = _list(obj, "subjects", where, empty_ok=False)
    rules = _list(obj, "rules", where, empty_ok=False)
    not_before = _opt_time_field(obj, "notBefore", where)
    expires_at = _opt_time_field(obj, "expiresAt", where)
    if not_before is not None and expires_at is not None and expires_at <= not_before:
        _fail(f"{where}.expiresAt", "must be after notBefore")
    return Grant(
        name=_str(obj, "name", where),
        subjects=tuple(_subject(s, f"{where}.subjects[{i}]") for i, s in enumerate(subjects)),
        rules=tuple(_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(rules)),
        tenant=_opt_str(obj, "tenant", where),
        not_before=not_before,
        expires_at=expires_at,
        rate_limit=_rate_limit(obj["rateLimit"], f"{where}.rateLimit"),
        reason=_str(obj, "reason", where, empty_ok=True),
    )


def _revocation(value: object, where: str) -> Revocation:
    keys = ("name", "issuer", "subject", "tokenId", "serviceAccountUid", "until")
    obj = _obj(value, where, keys)
    rev = Revocation(
        name=_str(obj, "name", where),
        issuer=_opt_str(obj, "issuer", where),
        subject=_opt_str(obj, "subject", where),
        token_id=_opt_str(obj, "tokenId", where),
        service_account_uid=_opt_str(obj, "serviceAccountUid", where),
        until=_opt_time_field(obj, "until", where),
    )
    if (rev.issuer is None) != (rev.subject is None):
        _fail(where, "issuer and subject must be set together")
    selectors = (rev.issuer is not None) + (rev.token_id is not None)
    selectors += rev.service_account_uid is not None
    if selectors != 1:
        _fail(where, "set exactly one of issuer+subject, tokenId, serviceAccountUid")
    return rev


_MAX_UID_LENGTH: Final = 64


def _uid_list(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    uids = _str_list(obj, key, where, empty_ok=True)
    for i, uid in enumerate(uids):
        if len(uid) > _MAX_UID_LENGTH:
            _fail(f"{where}.{key}[{i}]", f"a UID is at most {_MAX_UID_LENGTH} characters")
    return uids


def _identities(value: object, where: str) -> LiveIdentities:
    obj = _obj(value, where, ("observedAt", "serviceAccounts", "pods", "retired"))
    observed_at = _opt_time_field(obj, "observedAt", where)
    if observed_at is None:
        _fail(f"{where}.observedAt", "missing time")
    accounts = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(_list(obj, "serviceAccounts", where)):
        w = f"{where}.serviceAccounts[{i}]"
        a = _obj(item, w, ("namespace", "name", "uid"))
        account = LiveServiceAccount(
            namespace=_str(a, "namespace", w), name=_str(a, "name", w), uid=_opt_str(a, "uid", w)
        )
        if account.uid is not None and len(account.uid) > _MAX_UID_LENGTH:
            _fail(f"{w}.uid", f"a UID is at most {_MAX_UID_LENGTH} characters")
        if (account.namespace, account.name) in seen:
            _fail(w, f"duplicate service account {account.namespace}/{account.name}")
        seen.add((account.namespace, account.name))
        accounts.append(account)
    return LiveIdentities(
        observed_at=observed_at,
        service_accounts=tuple(accounts),
        pods=_uid_list(obj, "pods", where),
        retired=_uid_list(obj, "retired", where),
    )


def _issuer(value: object, where: str) -> IssuerConfig:
    keys = (
        "name",
        "issuer",
        "audiences",
        "algorithms",
        "maxTokenLifetimeSeconds",
        "clockSkewSeconds",
        "jwks",
        "jwksUri",
        "kubernetes",
        "refreshIntervalSeconds",
    )
    obj = _obj(value, where, keys)
    algorithms = _str_list(obj, "algorithms", where, empty_ok=False)
    for i, alg in enumerate(algorithms):
        if alg.lower() == "none":
            _fail(f"{where}.algorithms[{i}]", "'none' is never allowed")
    jwks = obj["jwks"]
    if jwks is not None and not isinstance(jwks, dict):
        _fail(f"{where}.jwks", f"expected an object, got {_type_name(jwks)}")
    jwks_uri = _opt_str(obj, "jwksUri", where)
    kubernetes = _bool(obj, "kubernetes", where)
    if jwks is not None and jwks_uri is not None:
        _fail(where, "set at most one of jwks and jwksUri")
    if jwks is None and jwks_uri is None and not kubernetes:
        _fail(where, "set one of jwks, jwksUri, kubernetes")
    return IssuerConfig(
        name=_str(obj, "name", where),
        issuer=_str(obj, "issuer", where),
        audiences=_str_list(obj, "audiences", where, empty_ok=True),
        algorithms=algorithms,
        max_token_lifetime_seconds=_int(obj, "maxTokenLifetimeSeconds", where, 1, 2**31),
        clock_skew_seconds=_int(obj, "clockSkewSeconds", where, 0, 2**31),
        jwks=jwks,
        jwks_uri=jwks_uri,
        kubernetes=kubernetes,
        refresh_interval_seconds=_int(obj, "refreshIntervalSeconds", where, 1, 2**31),
    )


def _service(value: object, where: str) -> ServiceConfig:
    keys = (
        "namespace",
        "name",
        "backendService",
        "backendPort",
        "tenant",
        "rateLimit",
        "upstreamCredential",
        "identityAssertion",
    )
    obj = _obj_optional(
        value, where, keys, ("mcpEndpoints", "authorizeOverrides", "websocketPaths")
    )
    authorise_method = authorise_path = False
    if "authorizeOverrides" in obj:
        w = f"{where}.authorizeOverrides"
        o = _obj(obj["authorizeOverrides"], w, ("method", "path"))
        authorise_method = _bool(o, "method", w)
        authorise_path = _bool(o, "path", w)
    mcp_endpoints: tuple[str, ...] = ()
    if "mcpEndpoints" in obj:
        mcp_endpoints = _str_list(obj, "mcpEndpoints", where, empty_ok=False)
        for i, endpoint in enumerate(mcp_endpoints):
            if not is_mcp_endpoint_path(endpoint):
                _fail(f"{where}.mcpEndpoints[{i}]", f"{endpoint!r} is not an MCP endpoint path")
        if len(set(mcp_endpoints)) != len(mcp_endpoints):
            _fail(f"{where}.mcpEndpoints", "duplicate endpoint")
    websocket_paths: tuple[str, ...] = ()
    if "websocketPaths" in obj:
        websocket_paths = _str_list(obj, "websocketPaths", where, empty_ok=False)
        for i, pattern in enumerate(websocket_paths):
            try:
                PathPattern.compile(pattern)
            except ValueError as exc:
                _fail(f"{where}.websocketPaths[{i}]", str(exc))
        if len(set(websocket_paths)) != len(websocket_paths):
            _fail(f"{where}.websocketPaths", "duplicate path")
    tenant: TenantMapping | None = None
    if obj["tenant"] is not None:
        w = f"{where}.tenant"
        t = _obj(obj["tenant"], w, ("header", "claim"))
        tenant = TenantMapping(header=_opt_str(t, "header", w), claim=_opt_str(t, "claim", w))
        if tenant.header is None and tenant.claim is None:
            _fail(w, "set header, claim, or both")
    cred: UpstreamCredential | None = None
    if obj["upstreamCredential"] is not None:
        w = f"{where}.upstreamCredential"
        c = _obj(obj["upstreamCredential"], w, ("header", "valueFile", "prefix"))
        cred = UpstreamCredential(
            header=_str(c, "header", w),
            value_file=_str(c, "valueFile", w),
            prefix=_str(c, "prefix", w, empty_ok=True),
        )
    assertion: IdentityAssertion | None = None
    if obj["identityAssertion"] is not None:
        w = f"{where}.identityAssertion"
        a = _obj(obj["identityAssertion"], w, ("header", "audience", "ttlSeconds"))
        assertion = IdentityAssertion(
            header=_str(a, "header", w),
            audience=_str(a, "audience", w, empty_ok=True),
            ttl_seconds=_int(a, "ttlSeconds", w, 1, 86400),
        )
    return ServiceConfig(
        namespace=_str(obj, "namespace", where),
        name=_str(obj, "name", where),
        backend_service=_str(obj, "backendService", where),
        backend_port=_int(obj, "backendPort", where, 1, 65535),
        tenant=tenant,
        rate_limit=_rate_limit(obj["rateLimit"], f"{where}.rateLimit"),
        upstream_credential=cred,
        identity_assertion=assertion,
        mcp_endpoints=mcp_endpoints,
        authorise_method_overrides=authorise_method,
        authorise_path_overrides=authorise_path,
        websocket_paths=websocket_paths,
    )


def _unique(names: Iterable[str], where: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            _fail(f"{where}[{i}].name", f"duplicate name {name!r}")
        seen.add(name)


def _parse_content(obj: dict[str, Any], version: str) -> PolicyDocument:
    if obj.get("apiVersion") != DOCUMENT_API_VERSION:
        _fail("apiVersion", f"expected {DOCUMENT_API_VERSION!r}, got {obj.get('apiVersion')!r}")
    issuers = tuple(_issuer(v, f"issuers[{i}]") for i, v in enumerate(_list(obj, "issuers", "")))
    grants = tuple(
        _fast_grant(v) or _grant(v, f"grants[{i}]") for i, v in enumerate(_list(obj, "grants", ""))
    )
    revocations = tuple(
        _revocation(v, f"revocations[{i}]") for i, v in enumerate(_list(obj, "revocations", ""))
    )
    _unique((i.name for i in issuers), "issuers")
    _unique((g.name for g in grants), "grants")
    _unique((r.name for r in revocations), "revocations")
    identities = obj.get("identities")
    return PolicyDocument(
        service=_service(obj["service"], "service"),
        issuers=issuers,
        grants=grants,
        revocations=revocations,
        version=version,
        identities=None if identities is None else _identities(identities, "identities"),
    )


# --- public API -----------------------------------------------------------------------------


def _delegation_key(delegation: Delegation | None) -> tuple[str, ...]:
    if delegation is None:
        return ()
    flags = f"depth={delegation.max_depth},required={delegation.required}"
    return ("\x00delegation", flags, *delegation.actors)


def _subject_key(subject: Subject) -> tuple[str, ...]:
    if isinstance(subject, ServiceAccountSubject):
        key: tuple[str, ...] = ("serviceAccount", subject.namespace, subject.name)
        return key + _delegation_key(subject.delegation)
    if isinstance(subject, TokenSubject):
        flat = tuple(f"{k}={v}" for k, v in subject.claims)
        key = ("token", subject.issuer, subject.subject or "", *flat)
        return key + _delegation_key(subject.delegation)
    return ("spiffeId", subject.spiffe_id)


def _canonical_delegation(delegation: Delegation | None) -> Delegation | None:
    if delegation is None:
        return None
    actors = tuple(sorted(set(delegation.actors)))
    if actors == delegation.actors:
        return delegation
    return Delegation(actors, delegation.max_depth, delegation.required)


def _canonical_subject(subject: Subject) -> Subject:
    if isinstance(subject, ServiceAccountSubject | TokenSubject) and subject.delegation:
        delegation = _canonical_delegation(subject.delegation)
        if delegation is not subject.delegation:
            if isinstance(subject, ServiceAccountSubject):
                return ServiceAccountSubject(subject.namespace, subject.name, delegation)
            subject = TokenSubject(subject.issuer, subject.subject, subject.claims, delegation)
    if not isinstance(subject, TokenSubject) or not subject.claims:
        return subject
    claims = dict(subject.claims)
    if len(claims) != len(subject.claims):
        for name, value in subject.claims:
            if claims[name] != value:
                raise PolicyDocumentError(
                    f"claims.{name}: conflicting required values for one claim"
                )
    ordered = tuple(sorted(claims.items()))
    if ordered == subject.claims:
        return subject
    return TokenSubject(subject.issuer, subject.subject, ordered, subject.delegation)


def _opt_canonical_time(t: float | None) -> float | None:
    if t is None:
        return None
    if not math.isfinite(t):
        raise PolicyDocumentError(f"time {t!r} is not a finite epoch time")
    return canonical_time(t)


def _canonical_subjects(subjects: tuple[Subject, ...]) -> tuple[Subject, ...]:
    if len(subjects) == 1:
        only = _canonical_subject(subjects[0])
        return subjects if only is subjects[0] else (only,)
    unique = {_subject_key(s): s for s in map(_canonical_subject, subjects)}
    ordered = tuple(unique[k] for k in sorted(unique))
    return subjects if ordered == subjects else ordered


def _canonical_rule(rule: Rule) -> Rule:
    mcp = rule.mcp
    if mcp is not None:
        canonical = McpRule(*(tuple(sorted(set(items))) for items in _mcp_lists(mcp)))
        return rule if canonical == mcp else Rule(frozenset(), (), canonical)
    paths = tuple(sorted(set(rule.paths)))
    return rule if paths == rule.paths else Rule(methods=rule.methods, paths=paths)


def _mcp_lists(mcp: McpRule) -> tuple[tuple[str, ...], ...]:
    return (mcp.endpoints, mcp.tools, mcp.resources, mcp.prompts)


def _rule_key(rule: Rule) -> tuple[tuple[str, ...], ...]:
    if rule.mcp is not None:  # after every HTTP rule; MCP rules ordered by their lists
        return (("\x7fmcp",), *_mcp_lists(rule.mcp))
    return (tuple(sorted(rule.methods)), rule.paths)


def _canonical_rules(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    canonical = {_rule_key(r): r for r in map(_canonical_rule, rules)}
    ordered = tuple(canonical[k] for k in sorted(canonical))
    return rules if ordered == rules else ordered


def _canonical_grant(grant: Grant) -> Grant:
    subjects = _canonical_subjects(grant.subjects)
    rules = _canonical_rules(grant.rules)
    not_before = _opt_canonical_time(grant.not_before)
    expires_at = _opt_canonical_time(grant.expires_at)
    if (
        subjects is grant.subjects
        and rules is grant.rules
        and not_before == grant.not_before
        and expires_at == grant.expires_at
    ):
        return grant  # already canonical (immutable, so it can be shared)
    return Grant(
        name=grant.name,
        subjects=subjects,
        rules=rules,
        tenant=grant.tenant,
        not_before=not_before,
        expires_at=expires_at,
        rate_limit=grant.rate_limit,
        reason=grant.reason,
    )


def _canonical_issuer(iss: IssuerConfig) -> IssuerConfig:
    return IssuerConfig(
        name=iss.name,
        issuer=iss.issuer,
        audiences=tuple(sorted(set(iss.audiences))),
        algorithms=tuple(sorted(set(iss.algorithms))),
        max_token_lifetime_seconds=iss.max_token_lifetime_seconds,
        clock_skew_seconds=iss.clock_skew_seconds,
        jwks=iss.jwks,
        jwks_uri=iss.jwks_uri,
        kubernetes=iss.kubernetes,
        refresh_interval_seconds=iss.refresh_interval_seconds,
    )


def _canonical_identities(live: LiveIdentities | None) -> LiveIdentities | None:
    if live is None:
        return None
    accounts = {(a.namespace, a.name): a for a in live.service_accounts}
    return LiveIdentities(
        observed_at=canonical_time(live.observed_at),
        service_accounts=tuple(accounts[k] for k in sorted(accounts)),
        pods=tuple(sorted(set(live.pods))),
        retired=tuple(sorted(set(live.retired))),
    )


def make_document(
    service: ServiceConfig,
    issuers: Iterable[IssuerConfig],
    grants: Iterable[Grant],
    revocations: Iterable[Revocation],
    identities: LiveIdentities | None = None,
) -> PolicyDocument:
    """Build a validated document in canonical order, with its content-hash `version`.

    Grants, issuers and revocations are sorted by name; a grant's subjects,
    rules and paths are sorted and de-duplicated; times are rounded to
    microseconds. Raises `PolicyDocumentError` (naming the field) when the
    result would not pass `decode_document`.
    """
    with gc_paused():
        canonical = _content_json(
            service,
            sorted(map(_canonical_issuer, issuers), key=_by_name),
            sorted(map(_canonical_grant, grants), key=_by_name),
            sorted(map(_canonical_revocation, revocations), key=_by_name),
            _canonical_identities(identities),
        )
        content = _canonical_bytes(canonical)
        version = _version_of_bytes(content)
        # Parse our own JSON back: one validator for producer and consumer.
        doc = _parse_content(json.loads(content), version)
    _remember_encoding(doc, _with_version(content, version))
    return doc


_ENCODED: dict[int, tuple[weakref.ref[PolicyDocument], bytes]] = {}
"""Canonical bytes of documents `make_document` built, while they live (the controller
encodes what it just made; the bytes are already known)."""


def _remember_encoding(doc: PolicyDocument, data: bytes) -> None:
    key = id(doc)

    def forget(_: weakref.ref[PolicyDocument]) -> None:
        _ENCODED.pop(key, None)  # runs when `doc` dies, before its id can be reused

    _ENCODED[key] = (weakref.ref(doc, forget), data)


def _known_encoding(doc: PolicyDocument) -> bytes | None:
    hit = _ENCODED.get(id(doc))
    return hit[1] if hit is not None and hit[0]() is doc else None


def _by_name(item: IssuerConfig | Grant | Revocation) -> str:
    return item.name


def _canonical_revocation(r: Revocation) -> Revocation:
    until = _opt_canonical_time(r.until)
    if until == r.until:
        return r
    return Revocation(r.name, r.issuer, r.subject, r.token_id, r.service_account_uid, until)


def _version_of_bytes(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()[:16]


def _content_bytes(doc: PolicyDocument) -> bytes:
    return _canonical_bytes(
        _content_json(doc.service, doc.issuers, doc.grants, doc.revocations, doc.identities)
    )


def _with_version(content: bytes, version: str) -> bytes:
    # "version" sorts after every other top-level key, so it is the last member.
    return content[:-1] + b',"version":"' + version.encode("ascii") + b'"}'


def document_content_version(doc: PolicyDocument) -> str:
    """The version `doc`'s content hashes to (equal to `doc.version` for a valid document)."""
    return _version_of_bytes(_content_bytes(doc))


def encode_document(doc: PolicyDocument) -> bytes:
    """Canonical JSON bytes of `doc` (sorted keys, no spaces, ASCII, times in RFC 3339 UTC)."""
    known = _known_encoding(doc)
    if known is not None:
        return known
    with gc_paused():
        return _with_version(_content_bytes(doc), doc.version)


def decode_document(data: bytes, *, reuse: GrantReuse | None = None) -> PolicyDocument:
    """Parse and strictly validate a policy document; raise `PolicyDocumentError` naming the
    field on unknown apiVersion, missing/unknown/ill-typed fields, invalid patterns, or a
    `version` that does not match the content.

    With `reuse`, grants whose canonical text is byte-identical to one of the document
    `reuse` last decoded are taken from it instead of being parsed and validated again
    (what a replica does on every reload); `reuse` then remembers this document.
    """
    with gc_paused():
        doc = None
        if reuse is not None and reuse.grants:
            doc = _decode_reusing(data, reuse)
        if doc is None:
            doc = _decode_canonical(data)
        canonical = doc is not None
        if doc is None:
            doc = _decode_any(data)
        if reuse is not None:
            reuse.remember(data if canonical else None, doc)
        return doc


class GrantReuse:
    """The grants of the last canonical document decoded, by their exact canonical text.

    Only text `decode_document` has verified is remembered: either the whole document was
    byte-for-byte the canonical encoding of what was parsed (and the grant texts are its
    split at grant boundaries, with the count checked), or each grant's text was parsed,
    validated and re-encoded to the same bytes. So a grant reused by text is exactly the
    grant a full decode of that text would build.
    """

    __slots__ = ("grants",)

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}
        """canonical grant text -> the validated grant it encodes"""

    def remember(self, data: bytes | None, doc: PolicyDocument) -> None:
        """Keep `doc`'s grants by text (`data`: its canonical bytes; None: not canonical)."""
        split = None if data is None else _split_grants(data)
        if split is None or len(split[0]) != len(doc.grants):
            self.grants = {}
            return
        self.grants = dict(zip(split[0], doc.grants, strict=True))


_GRANT_START: Final = '{"expiresAt":'
"""Every canonical grant begins so: `expiresAt` is its first key in sorted order."""
_GRANTS_HEAD: Final = (
    '{"apiVersion":' + json.dumps(DOCUMENT_API_VERSION) + ',"grants":[' + _GRANT_START
)
_GRANTS_TAIL: Final = '}],"i'
"""Where a canonical grants array ends: before `identities` or `issuers`. Never inside a
canonical grant: in it, only `rules` and `subjects` are arrays of objects, followed by
`"subjects"` and `"tenant"`, and a string holds no unescaped quote."""
_GRANTS_ARRAY: Final = len(_GRANTS_HEAD) - len(_GRANT_START)
"""Offset of the first grant in a canonical document."""


def _split_grants(data: bytes) -> tuple[list[str], bytes] | None:
    """A canonical document's grant texts, split at grant boundaries (`,{"expiresAt":`), and
    the document with an empty grants array; None if it has no grants or is not ASCII.

    Nothing here is verified: the caller either checks the count against the grants it
    verified as a whole (every real boundary is a split point, so an equal count means no
    other split happened) or verifies each text and the rest on their own.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.startswith(_GRANTS_HEAD):
        return None
    end = text.find(_GRANTS_TAIL, _GRANTS_ARRAY) + 1  # the grants array's "]"
    if end <= 0:
        return None
    pieces = text[_GRANTS_ARRAY + len(_GRANT_START) : end].split("," + _GRANT_START)
    return [_GRANT_START + piece for piece in pieces], data[:_GRANTS_ARRAY] + data[end:]


def _grant_from_text(text: str) -> Grant | None:
    """Parse and validate one grant; None unless `text` is exactly its canonical encoding."""
    value = json.loads(text)
    grant = _fast_grant(value) or _grant(value, "grants[]")
    return grant if _canonical_bytes(_grant_json(grant)) == text.encode("ascii") else None


def _decode_reusing(data: bytes, reuse: GrantReuse) -> PolicyDocument | None:
    """`_decode_canonical`, taking unchanged grants from `reuse`; None when in doubt.

    The grants array is split into grant texts; each is either one `reuse` verified
    before or is verified now (`_grant_from_text`). The rest of the document, with an
    empty grants array, goes through `_parse_canonical` (validated and re-encoded to the
    same bytes), and the content hash of the whole `data` must be its `version`. So `data`
    is the canonical encoding of the document returned, as `_decode_canonical` requires.
    """
    try:
        split = _split_grants(data)
        if split is None:
            return None
        texts, skeleton = split
        known = reuse.grants
        grants = []
        for text in texts:
            grant = known.get(text)
            if grant is None:
                grant = _grant_from_text(text)
                if grant is None:
                    return None
            grants.append(grant)
        rest = _parse_canonical(skeleton)
        if rest is None:
            return None
        # `data` ends as `skeleton` does, which `_parse_canonical` checked.
        if _version_of_bytes(_without_version(data)) != rest.version:
            return None
        _unique((g.name for g in grants), "grants")
    except Exception:  # the strict path reports it
        return None
    return PolicyDocument(
        service=rest.service,
        issuers=rest.issuers,
        grants=tuple(grants),
        revocations=rest.revocations,
        version=rest.version,
        identities=rest.identities,
    )


_TOP_KEYS: Final = ("apiVersion", "version", "service", "issuers", "grants", "revocations")
_TOP_KEYSET: Final = frozenset(_TOP_KEYS)
_TOP_KEYSETS: Final = (_TOP_KEYSET, _TOP_KEYSET | {"identities"})


def _decode_canonical(data: bytes) -> PolicyDocument | None:
    """The fast path for documents exactly as `encode_document` writes them, else None.

    The same validator runs; the only check it skips is the duplicate-key hook, which is
    redundant here: the input is byte-for-byte the canonical encoding of what was parsed,
    and a canonical encoding has no duplicate keys (nor NaN, nor whitespace). Anything
    else, valid or not, goes through `_decode_any`, which reports the precise error.
    """
    doc = _parse_canonical(data)
    if doc is None or _version_of_bytes(_without_version(data)) != doc.version:
        return None
    return doc


_VERSION_MEMBER_LENGTH: Final = len(',"version":"sha256:0123456789abcdef"')


def _without_version(data: bytes) -> bytes:
    """The content bytes of a canonical document (`_with_version` undone)."""
    return data[: -_VERSION_MEMBER_LENGTH - 1] + b"}"


def _parse_canonical(data: bytes) -> PolicyDocument | None:
    """`data` parsed and validated if it is byte-for-byte the canonical encoding of the
    result (its claimed `version` not checked against the content), else None."""
    try:
        obj = json.loads(data)
        if type(obj) is not dict or obj.keys() not in _TOP_KEYSETS:
            return None
        version = obj["version"]
        if type(version) is not str or _VERSION_RE.fullmatch(version) is None:
            return None
        doc = _parse_content(obj, version)
        content = _content_bytes(doc)
    except Exception:  # the strict path reports it
        return None
    return doc if _with_version(content, version) == data else None


def _decode_any(data: bytes) -> PolicyDocument:
    try:
        obj = json.loads(
            data, object_pairs_hook=reject_duplicate_keys, parse_constant=reject_constant
        )
    except StrictJsonError as exc:
        raise PolicyDocumentError(f"document: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicyDocumentError(f"document: not valid JSON: {exc}") from None
    if isinstance(obj, dict) and obj.get("apiVersion") != DOCUMENT_API_VERSION:
        _fail("apiVersion", f"expected {DOCUMENT_API_VERSION!r}, got {obj.get('apiVersion')!r}")
    obj = _obj_optional(obj, "", _TOP_KEYS, ("identities",))
    version = obj["version"]
    if not isinstance(version, str) or _VERSION_RE.fullmatch(version) is None:
        _fail("version", "expected 'sha256:' followed by 16 lower-case hex digits")
    doc = _parse_content(obj, version)
    actual = document_content_version(doc)
    if actual != version:
        _fail("version", f"{version} does not match the content (which hashes to {actual})")
    return doc


# --- packed form (the ConfigMap's binaryData) -----------------------------------------------

MAX_DOCUMENT_BYTES: Final = 64 * 1024 * 1024
"""Largest decompressed document `unpack_document` accepts (a gzip bomb stops here)."""
_GZIP_LEVEL: Final = 6  # level 9 is ~3x slower for a few percent on this JSON
_INFLATE_CHUNK: Final = 1024 * 1024


def pack_document(doc: PolicyDocument) -> bytes:
    """`encode_document(doc)` gzip-compressed, deterministically (mtime 0, fixed level).

    This is what the policy ConfigMap carries in `binaryData["policy.json.gz"]`: a
    10k-grant document is ~3 MiB of JSON but well under the 1 MiB ConfigMap limit packed.
    The same document always packs to the same bytes.
    """
    return gzip.compress(encode_document(doc), compresslevel=_GZIP_LEVEL, mtime=0)


def unpack_document(
    data: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES, reuse: GrantReuse | None = None
) -> PolicyDocument:
    """Decompress a `pack_document` payload and `decode_document` it (`reuse`: see there).

    Decompression is bounded: output beyond `max_bytes` raises `PolicyDocumentError`
    without ever being held in memory, as do a truncated stream, data after the gzip
    member, and input that is not gzip at all.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PolicyDocumentError(f"document: expected gzip bytes, got {type(data).__name__}")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container only
    chunks: list[bytes] = []
    total = 0
    pending = data if isinstance(data, bytes) else bytes(data)
    try:
        # Inflate a chunk at a time so a bomb is stopped at the limit, not after it.
        while True:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            total += len(chunk)
            if total > max_bytes:
                raise PolicyDocumentError(f"document: decompresses to more than {max_bytes} bytes")
            chunks.append(chunk)
            pending = inflater.unconsumed_tail
            if inflater.eof or (not pending and len(chunk) < _INFLATE_CHUNK):
                break
    except zlib.error as exc:
        raise PolicyDocumentError(f"document: not valid gzip: {exc}") from None
    if not inflater.eof:
        raise PolicyDocumentError("document: gzip stream is truncated")
    if inflater.unused_data:
        raise PolicyDocumentError("document: unexpected data after the gzip stream")
    text = b"".join(chunks)
    del chunks
    return decode_document(text, reuse=reuse)
