"""`nhigate explain` and `nhigate who-can`: answer access questions offline, from YAML files.

Both compile the same policy document the controller would (nhigate.api.compile)
and ask the same engine the proxy uses (nhigate.policy), so the answer is the
proxy's answer. Exit codes: 0 allowed (who-can: someone may), 1 denied
(who-can: nobody), 2 bad input.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from nhigate.api.compile import grant_applies
from nhigate.api.governance import judge_grant_policy
from nhigate.api.models import IdentityIssuer
from nhigate.api.resources import ResourceError, ResourceSet, load_resources
from nhigate.policy import (
    Decision,
    Delegation,
    Facts,
    Identity,
    IdentityKind,
    PathRejected,
    Policy,
    Reason,
    ServiceAccountRef,
    ServiceAccountSubject,
    SpiffeSubject,
    Subject,
    TokenSubject,
    compile_policy,
    explain,
    normalise_path,
    who_can,
)
from nhigate.policy.mcp import McpKind, explain_mcp, mcp_endpoint_of, who_can_mcp
from nhigate.policy.model import (
    service_account_of_subject,
    service_account_subject,
    token_identity,
)
from nhigate.policy.times import format_seconds, parse_rfc3339

EXIT_ALLOWED = 0
EXIT_DENIED = 1
EXIT_BAD_INPUT = 2

_METHOD = re.compile(r"^[A-Za-z]{1,20}$")


class InputError(ValueError):
    """Bad command-line input; printed as an error with exit code 2."""


# --- argument parsing -----------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resources",
        "-r",
        action="append",
        required=True,
        type=Path,
        metavar="PATH",
        help="a YAML file or directory of nhigate resources (repeat for several)",
    )
    parser.add_argument(
        "--service",
        metavar="NAME",
        help="the ProtectedService (optional when the resources hold exactly one)",
    )
    parser.add_argument("--namespace", "-n", metavar="NS", help="namespace of the ProtectedService")
    parser.add_argument(
        "--at",
        metavar="RFC3339",
        help="evaluate at this time, e.g. 2026-01-02T03:04:05Z (default: now)",
    )
    mcp = parser.add_mutually_exclusive_group()
    mcp.add_argument(
        "--mcp-tool",
        metavar="NAME",
        help="on an MCP endpoint PATH: the tool a tools/call names (docs/mcp.md)",
    )
    mcp.add_argument("--mcp-resource", metavar="URI", help="on an MCP endpoint: resources/read")
    mcp.add_argument("--mcp-prompt", metavar="NAME", help="on an MCP endpoint: prompts/get")
    parser.add_argument("method", metavar="METHOD", help="HTTP method, e.g. GET")
    parser.add_argument("path", metavar="PATH", help="request path, e.g. /v1/payments/42")


def add_parser(subparsers: Any) -> None:
    """Register `explain` and `who-can` on the `nhigate` sub-command parser."""
    explain_parser = subparsers.add_parser(
        "explain",
        help="explain whether a request would be allowed, and why",
        description=(
            "Decide one request offline against the resources in --resources, exactly as the "
            "proxy would, and show the matching grant or why each grant for the caller does "
            "not match. Exit 0 when allowed, 1 when denied, 2 on bad input."
        ),
    )
    _add_common(explain_parser)
    explain_parser.add_argument(
        "--as",
        dest="as_identity",
        metavar="IDENTITY",
        help="serviceaccount:NS/NAME, token:ISSUER/SUBJECT (ISSUER is an IdentityIssuer "
        "name) or a spiffe:// ID",
    )
    explain_parser.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="K=V",
        help="a token claim (repeatable); adds to or overrides --token's claims",
    )
    explain_parser.add_argument(
        "--token",
        metavar="JWT",
        help="take the identity from a JWT's claims; the signature is NOT verified",
    )
    explain_parser.add_argument("--tenant", metavar="T", help="the tenant the request resolves to")
    explain_parser.add_argument(
        "--actor",
        action="append",
        default=[],
        metavar="SUB",
        help="an RFC 8693 actor acting for the identity (repeat for a chain, current actor "
        "first); replaces --token's act chain",
    )
    explain_parser.set_defaults(func=run_explain)

    who_parser = subparsers.add_parser(
        "who-can",
        help="list the subjects that may call METHOD PATH",
        description=(
            "List every grant subject that may call METHOD PATH at the given time. Revocations "
            "apply to single credentials and are not considered. Exit 0 when someone may, "
            "1 when nobody may, 2 on bad input."
        ),
    )
    _add_common(who_parser)
    who_parser.set_defaults(func=run_who_can)


# --- inputs ---------------------------------------------------------------------------------


def parse_at(text: str | None) -> datetime:
    """`--at`: RFC 3339 with an offset (or `Z`); now when absent."""
    if text is None:
        return datetime.now(UTC)
    try:
        return datetime.fromtimestamp(parse_rfc3339(text), UTC)
    except ValueError as exc:
        raise InputError(f"--at {exc}") from None


def parse_method(text: str) -> str:
    """An HTTP method, upper-cased."""
    if _METHOD.fullmatch(text) is None:
        raise InputError(f"METHOD {text!r}: expected an HTTP method such as GET or POST")
    return text.upper()


def parse_claims(items: Sequence[str]) -> dict[str, object]:
    """`--claim K=V` pairs."""
    claims: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"--claim {item!r}: expected NAME=VALUE")
        claims[name] = value
    return claims


def decode_unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, WITHOUT checking the signature (explain only)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise InputError("--token: not a JWT (expected three dot-separated parts)")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError):
        raise InputError("--token: the payload is not base64url-encoded JSON") from None
    if not isinstance(claims, dict):
        raise InputError("--token: the payload is not a JSON object")
    return claims


@dataclass(frozen=True)
class Caller:
    """The identity to explain, plus token problems the proxy would reject it for."""

    identity: Identity
    description: str
    unverified_claims: Mapping[str, Any] | None = None
    rejected: tuple[Reason, str] | None = None
    notes: list[str] = field(default_factory=list)


def _kubernetes_issuer(issuers: Sequence[IdentityIssuer], names: Sequence[str]) -> str:
    for issuer in issuers:
        if issuer.name in names and issuer.spec.kubernetes is not None:
            return issuer.name
    return ""


def _service_account_from_subject(subject: str, uid: str | None) -> ServiceAccountRef | None:
    account = service_account_of_subject(subject)
    if account is None:
        return None
    return ServiceAccountRef(namespace=account[0], name=account[1], uid=uid)


def _issuer_by_name(issuers: Sequence[IdentityIssuer], name: str) -> IdentityIssuer | None:
    return next((i for i in issuers if i.name == name), None)


def caller_from_as(
    text: str, claims: dict[str, object], issuers: Sequence[IdentityIssuer], names: Sequence[str]
) -> Caller:
    """Build the caller from `--as`."""
    if text.startswith("spiffe://"):
        identity = Identity(
            kind=IdentityKind.SPIFFE, issuer="", subject=text, claims=claims, spiffe_id=text
        )
        return Caller(identity, f"SPIFFE ID {text}")
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if sep and scheme in ("serviceaccount", "sa"):
        namespace, slash, name = rest.partition("/")
        if not slash or not namespace or not name:
            raise InputError(f"--as {text!r}: expected serviceaccount:NAMESPACE/NAME")
        issuer = _kubernetes_issuer(issuers, names)
        identity = token_identity(
            issuer,
            service_account_subject(namespace, name),
            claims,
            service_account=ServiceAccountRef(namespace=namespace, name=name),
        )
        notes = []
        if not issuer:
            notes.append(
                "the service trusts no `kubernetes` IdentityIssuer: the proxy could not verify "
                "a service-account token"
            )
        return Caller(identity, f"service account {namespace}/{name}", notes=notes)
    if sep and scheme == "token":
        issuer_name, slash, subject = rest.partition("/")
        if not slash or not issuer_name or not subject:
            raise InputError(f"--as {text!r}: expected token:ISSUER/SUBJECT")
        notes = []
        if issuer_name not in names:
            notes.append(f"the service does not trust an issuer named {issuer_name!r}")
        resource = _issuer_by_name(issuers, issuer_name)
        sa = None
        if resource is not None and resource.spec.kubernetes is not None:
            sa = _service_account_from_subject(subject, None)
        identity = token_identity(issuer_name, subject, claims, service_account=sa)
        return Caller(identity, f"token from issuer {issuer_name}, subject {subject}", notes=notes)
    raise InputError(
        f"--as {text!r}: expected serviceaccount:NS/NAME, token:ISSUER/SUBJECT or spiffe://..."
    )


def caller_from_token(
    token: str,
    extra_claims: dict[str, object],
    issuers: Sequence[IdentityIssuer],
    names: Sequence[str],
    now: datetime,
) -> Caller:
    """Build the caller from an unverified JWT's claims (`--token`)."""
    claims: dict[str, Any] = {**decode_unverified_claims(token), **extra_claims}
    iss = claims.get("iss")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InputError("--token: the token has no `sub` claim")
    jti = claims.get("jti") if isinstance(claims.get("jti"), str) else None
    trusted = [i for i in issuers if i.name in names]
    resource = next((i for i in trusted if i.spec.issuer == iss), None)
    rejected: tuple[Reason, str] | None = None
    issuer_name = resource.name if resource is not None else ""
    sa = None
    if resource is not None and resource.spec.kubernetes is not None:
        k8s = claims.get("kubernetes.io")
        uid = None
        if isinstance(k8s, dict) and isinstance(k8s.get("serviceaccount"), dict):
            raw_uid = k8s["serviceaccount"].get("uid")
            uid = raw_uid if isinstance(raw_uid, str) else None
        sa = _service_account_from_subject(sub, uid)
    if resource is None:
        rejected = (Reason.UNKNOWN_ISSUER, f"no trusted IdentityIssuer has issuer {iss!r}")
    else:
        exp = claims.get("exp")
        nbf = claims.get("nbf")
        at = now.timestamp()
        audience = _audience_problem(claims, resource.spec.audiences)
        if audience is not None:
            rejected = audience
        elif isinstance(exp, int | float) and at >= exp:
            rejected = (Reason.TOKEN_EXPIRED, f"token expired at {format_seconds(exp)}")
        elif isinstance(nbf, int | float) and at < nbf:
            rejected = (Reason.TOKEN_NOT_YET_VALID, f"token not valid before {format_seconds(nbf)}")
    identity = token_identity(issuer_name, sub, claims, service_account=sa, token_id=jti)
    return Caller(
        identity,
        f"token from issuer {issuer_name or iss!r}, subject {sub}",
        unverified_claims=claims,
        rejected=rejected,
    )


def _audience_problem(
    claims: Mapping[str, Any], trusted: Sequence[str]
) -> tuple[Reason, str] | None:
    """Why the proxy would refuse the token's `aud` (its own check), or None."""
    from nhigate.proxy.tokens import TokenError, audiences

    try:
        named = audiences(claims)
    except TokenError as exc:
        return (exc.reason, exc.detail)
    if named.isdisjoint(trusted):
        return (
            Reason.AUDIENCE_MISMATCH,
            f"token audience {sorted(named)} names none of {list(trusted)}",
        )
    return None


def _with_actors(caller: Caller, actors: Sequence[str]) -> Caller:
    """The caller with its actor chain: --actor values, else the --token's `act` claims."""
    chain = tuple(actors)
    if not chain and caller.unverified_claims is not None:
        from nhigate.proxy.tokens import TokenError, actor_chain

        try:
            chain = actor_chain(dict(caller.unverified_claims))
        except TokenError as exc:
            return replace(caller, rejected=(Reason.TOKEN_INVALID, exc.detail))
    if not chain:
        return caller
    return replace(caller, identity=replace(caller.identity, actors=chain))


# --- output ---------------------------------------------------------------------------------


def describe_subject(subject: Subject) -> str:
    """One line naming a grant subject."""
    if isinstance(subject, ServiceAccountSubject):
        text = f"service account {subject.namespace}/{subject.name}"
        return text + _describe_delegation(subject.delegation)
    if isinstance(subject, SpiffeSubject):
        return f"SPIFFE ID {subject.spiffe_id}"
    assert isinstance(subject, TokenSubject)
    parts = [f"token from issuer {subject.issuer}"]
    parts.append(f"subject {subject.subject}" if subject.subject else "any subject")
    if subject.claims:
        parts.append("with " + ", ".join(f"{k}={v}" for k, v in subject.claims))
    return ", ".join(parts) + _describe_delegation(subject.delegation)


def _describe_delegation(delegation: Delegation | None) -> str:
    if delegation is None:
        return ""
    required = ", required" if delegation.required else ""
    actors = ", ".join(delegation.actors)
    return f", acted for by [{actors}] (max depth {delegation.max_depth}{required})"


def mcp_target(args: argparse.Namespace) -> tuple[McpKind | None, str, str] | None:
    """(kind, name, flag) from --mcp-tool/--mcp-resource/--mcp-prompt, or None."""
    for kind, flag, value in (
        (McpKind.TOOL, "--mcp-tool", args.mcp_tool),
        (McpKind.RESOURCE, "--mcp-resource", args.mcp_resource),
        (McpKind.PROMPT, "--mcp-prompt", args.mcp_prompt),
    ):
        if value is not None:
            return kind, value, flag
    return None


_REASON_TEXT: dict[Reason, str] = {
    Reason.ALLOWED: "a grant allows this identity to make this request",
    Reason.NO_MATCHING_GRANT: "no grant gives this identity this method on this path",
    Reason.GRANT_NOT_YET_VALID: "the grant that would allow it is not valid yet",
    Reason.GRANT_EXPIRED: "the grant that would allow it has expired",
    Reason.TENANT_MISMATCH: "the grant that would allow it is for another tenant",
    Reason.REVOKED: "this credential is revoked",
    Reason.PATH_REJECTED: "the path cannot be normalised safely, so the proxy rejects it",
}


def _decision_line(decision: Decision) -> str:
    verdict = "ALLOWED" if decision.allowed else "DENIED"
    text = _REASON_TEXT.get(decision.reason, decision.reason.value.replace("_", " "))
    grant = f" (grant {decision.grant})" if decision.grant else ""
    return f"{verdict}: {decision.reason.value}: {text}{grant}"


def _print_header(
    out: TextIO,
    version: str,
    policy: Policy,
    method: str,
    raw_path: str,
    canonical: str | None,
    now: datetime,
) -> None:
    service = policy.document.service
    out.write(f"service:   {service.namespace}/{service.name} (policy {version})\n")
    out.write(f"request:   {method} {raw_path}\n")
    if canonical is not None and canonical != raw_path:
        out.write(f"path:      normalised to {canonical} (the path authorised and forwarded)\n")
    out.write(f"time:      {format_seconds(now.timestamp())}\n")


def _explain(args: argparse.Namespace, out: TextIO) -> int:
    now = parse_at(args.at)
    method = parse_method(args.method)
    if (args.as_identity is None) == (args.token is None):
        raise InputError("give exactly one of --as IDENTITY or --token JWT")
    resources = _load(args.resources)
    service = resources.service(args.service, args.namespace)
    document = resources.policy_document_for(
        service.name, now, namespace=service.namespace, drop_expired=False
    )
    policy = compile_policy(document)
    # Expired grants are kept above so they can be explained; report the version the
    # controller would actually deploy.
    deployed = resources.policy_document_for(service.name, now, namespace=service.namespace)
    claims = parse_claims(args.claim)
    names = list(service.spec.issuers)
    if args.token is not None:
        caller = caller_from_token(args.token, claims, resources.issuers, names, now)
    else:
        caller = caller_from_as(args.as_identity, claims, resources.issuers, names)
    caller = _with_actors(caller, args.actor)

    canonical: str | None = None
    path_problem: str | None = None
    try:
        canonical = normalise_path(args.path)
    except PathRejected as exc:
        path_problem = str(exc)

    _print_header(out, deployed.version, policy, method, args.path, canonical, now)
    out.write(f"identity:  {caller.description}\n")
    if caller.identity.claims:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(caller.identity.claims.items()))
        out.write(f"claims:    {shown}\n")
    if caller.unverified_claims is not None:
        out.write("           (read from --token WITHOUT signature verification)\n")
    if caller.identity.actors:
        out.write(f"actors:    {' -> '.join(caller.identity.actors)} (current actor first)\n")
    if args.tenant is not None:
        out.write(f"tenant:    {args.tenant}\n")
    for note in caller.notes:
        out.write(f"note:      {note}\n")
    for grant in resources.grants:  # not compiled (fail closed): say why they cannot allow
        if not grant_applies(grant, service):
            continue
        breach = judge_grant_policy(grant, service, resources.issuers, now=now)
        if breach is not None:
            out.write(f"refused:   {grant.key}: {breach.reason}: {breach.message}\n")
    out.write("\n")

    if caller.rejected is not None:
        reason, detail = caller.rejected
        out.write(f"DENIED: {reason.value}: the proxy rejects this token before authorisation\n")
        out.write(f"  {detail}\n")
        return EXIT_DENIED
    if path_problem is not None:
        out.write(f"DENIED: {Reason.PATH_REJECTED.value}: {_REASON_TEXT[Reason.PATH_REJECTED]}\n")
        out.write(f"  {path_problem}\n")
        return EXIT_DENIED
    assert canonical is not None

    target = mcp_target(args)
    endpoint = mcp_endpoint_of(policy.document.service, canonical)
    if target is not None and endpoint is None:
        raise InputError(f"{target[2]}: {canonical} is not an MCP endpoint of this service")
    if endpoint is not None:
        kind, name = (target[0], target[1]) if target is not None else (None, "")
        what = f"{kind.value} {name}" if kind is not None else "session-level methods only"
        out.write(f"MCP:       endpoint {endpoint}: {what}\n")
        explanation = explain_mcp(
            policy, caller.identity, endpoint, kind, name, now.timestamp(), args.tenant
        )
    else:
        facts = Facts(
            identity=caller.identity,
            method=method,
            path=canonical,
            now=now.timestamp(),
            tenant=args.tenant,
        )
        explanation = explain(policy, facts)
    out.write(_decision_line(explanation.decision) + "\n")
    if explanation.revocation is not None:
        out.write(f"  revoked by Revocation {explanation.revocation}\n")
    out.write("\n")
    if not explanation.verdicts:
        out.write("No grant for this service names this identity.\n")
        near = near_misses(policy, caller.identity)
        for line in near:
            out.write(f"  {line}\n")
        if not near and policy.grants:
            listed = ", ".join(g.name for g in policy.grants)
            out.write(f"Grants for this service: {listed}\n")
    else:
        out.write(f"Grants naming this identity ({len(explanation.verdicts)}):\n")
        for verdict in explanation.verdicts:
            mark = "allows" if verdict.matched else "does not allow"
            out.write(f"  {verdict.grant}: {mark}\n")
            if verdict.subject is not None:
                out.write(f"      matched subject: {describe_subject(verdict.subject)}\n")
            for problem in verdict.why_not:
                out.write(f"      - {problem}\n")
    return EXIT_ALLOWED if explanation.decision.allowed else EXIT_DENIED


def near_misses(policy: Policy, identity: Identity) -> list[str]:
    """Token subjects that match the caller's issuer and subject but not every claim."""
    lines = []
    for grant in policy.grants:
        for subject in grant.subjects:
            if not isinstance(subject, TokenSubject) or subject.issuer != identity.issuer:
                continue
            if subject.subject is not None and subject.subject != identity.subject:
                continue
            missing = [
                f"{name}={value}"
                for name, value in subject.claims
                if str(identity.claims.get(name)) != value
            ]
            if missing:
                lines.append(
                    f"{grant.name} would match, but requires claim(s) {', '.join(missing)} "
                    "that the caller does not have"
                )
    return lines


def _who_can(args: argparse.Namespace, out: TextIO) -> int:
    now = parse_at(args.at)
    method = parse_method(args.method)
    resources = _load(args.resources)
    service = resources.service(args.service, args.namespace)
    policy = compile_policy(
        resources.policy_document_for(service.name, now, namespace=service.namespace)
    )
    try:
        canonical = normalise_path(args.path)
    except PathRejected as exc:
        _print_header(out, policy.version, policy, method, args.path, None, now)
        out.write(f"\nNobody: the proxy rejects this path ({exc}).\n")
        return EXIT_DENIED
    _print_header(out, policy.version, policy, method, args.path, canonical, now)
    target = mcp_target(args)
    endpoint = mcp_endpoint_of(policy.document.service, canonical)
    if target is not None and endpoint is None:
        raise InputError(f"{target[2]}: {canonical} is not an MCP endpoint of this service")
    what = f"{method} {canonical}"
    if endpoint is not None:
        kind, name = (target[0], target[1]) if target is not None else (None, "")
        what = f"use {kind.value} {name} on MCP endpoint {endpoint}" if kind else f"use {endpoint}"
        answers = who_can_mcp(policy, endpoint, kind, name, now.timestamp())
    else:
        answers = who_can(policy, method, canonical, now.timestamp())
    out.write("\n")
    if not answers:
        out.write(f"Nobody may {what} at this time.\n")
        return EXIT_DENIED
    out.write(f"May {what}:\n")
    for grant, subject in answers:
        extras = []
        if grant.tenant is not None:
            extras.append(f"tenant {grant.tenant}")
        if grant.expires_at is not None:
            extras.append(f"until {format_seconds(grant.expires_at)}")
        suffix = f" [{'; '.join(extras)}]" if extras else ""
        out.write(f"  {describe_subject(subject)}  (grant {grant.name}){suffix}\n")
    out.write("\nRevocations apply to single credentials and are not listed here.\n")
    return EXIT_ALLOWED


def _load(paths: Sequence[Path]) -> ResourceSet:
    return load_resources(paths)


def _run(func: Any, args: argparse.Namespace, command: str) -> int:
    try:
        result: int = func(args, sys.stdout)
    except (InputError, ResourceError) as exc:
        sys.stdout.flush()
        print(f"nhigate {command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return result


def run_explain(args: argparse.Namespace) -> int:
    """`nhigate explain`: print the decision and why; 0 allowed, 1 denied, 2 bad input."""
    return _run(_explain, args, "explain")


def run_who_can(args: argparse.Namespace) -> int:
    """`nhigate who-can`: list who may call METHOD PATH; 0 someone, 1 nobody, 2 bad input."""
    return _run(_who_can, args, "who-can")
