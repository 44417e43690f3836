"""The review for people (a table), for tools (JSON) and for `kubectl apply` (YAML)."""

from __future__ import annotations

from typing import Any

import orjson

from nhigate.policy.times import format_seconds
from nhigate.review.proposal import to_yaml
from nhigate.review.report import GrantReview, Review, describe_identity

JSON_FORMAT = "nhigate.io/access-review/v1"
"""`format` of the JSON output; a new value for any incompatible change."""


def fmt_time(epoch: float | None) -> str:
    """RFC 3339 UTC, to the second; `-` for never."""
    if epoch is None:
        return "-"
    return format_seconds(epoch)


def _rules_used(grant: GrantReview) -> str:
    rules = grant.usage.grant.rules
    used = sum(
        1
        for rule, usage in zip(rules, grant.usage.rules, strict=True)
        if (usage.requests if rule.mcp is None else grant.usage.mcp_requests)
    )
    return f"{used}/{len(rules)}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def render_table(review: Review) -> str:
    """The review as text: a summary, a table per service, findings, denied callers, diffs."""
    stats, usage = review.stats, review.usage
    lines = [
        f"audit:    {stats.records} records in {stats.lines} lines "
        f"({usage.allowed} allowed, {usage.denied} denied), "
        f"{fmt_time(usage.first_time)} .. {fmt_time(usage.last_time)}",
    ]
    if stats.malformed:
        where = ", ".join(str(n) for n in stats.malformed_lines)
        lines.append(f"          {stats.malformed} lines are not audit records (lines {where} ...)")
    if usage.unknown_grants:
        names = ", ".join(f"{g} x{n}" for g, n in usage.unknown_grants.most_common(5))
        lines.append(f"          allowed by grants not reviewed (absent or not --service): {names}")
    lines.append(f"reviewed: {fmt_time(review.settings.at)}")
    for service in review.services:
        grants = [g for g in review.grants if g.service == service]
        lines += ["", f"ProtectedService {service}"]
        rows = [["  GRANT", "REQUESTS", "LAST USED", "RULES USED", "FINDINGS"]]
        for g in grants:
            kinds = sorted({f.kind.value for f in g.findings})
            rows.append(
                [
                    f"  {g.key}",
                    str(g.usage.requests),
                    fmt_time(g.usage.last_used),
                    _rules_used(g),
                    ", ".join(kinds) or "-",
                ]
            )
        lines += _table(rows)
    findings = [(g.key, f) for g in review.grants for f in g.findings]
    if findings:
        lines += ["", "Findings:"]
        lines += _table([[f"  {key}", f.kind.value, f.message] for key, f in findings])
    if review.callers:
        lines += ["", f"Callers denied {review.settings.min_denials} times or more:"]
        rows = [["  IDENTITY", "DENIALS", "LAST DENIED", "REASONS", "TRIED (TOP 3)"]]
        for c in review.callers:
            d = c.denials
            rows.append(
                [
                    f"  {describe_identity(c.identity)}",
                    str(d.denials),
                    fmt_time(d.last_denied),
                    ", ".join(f"{r} x{n}" for r, n in d.reasons.most_common(3)),
                    ", ".join(f"{m} {p} x{n}" for (m, p), n in d.tried.most_common(3)),
                ]
            )
        lines += _table(rows)
    changed = [g for g in review.grants if g.diff]
    if changed:
        lines += ["", "Proposed grants (apply with: nhigate access-review ... --output yaml):"]
        for g in changed:
            if g.proposal is None:
                lines.append(f"  {g.key}: unused: delete it")
            else:
                lines.append(g.diff.rstrip("\n"))
    return "\n".join(lines) + "\n"


def review_json(review: Review) -> dict[str, Any]:
    """The review as a JSON-ready object (documented in docs/access-review.md)."""
    usage = review.usage
    return {
        "format": JSON_FORMAT,
        "reviewedAt": fmt_time(review.settings.at),
        "audit": {
            "lines": review.stats.lines,
            "records": review.stats.records,
            "malformed": review.stats.malformed,
            "allowed": usage.allowed,
            "denied": usage.denied,
            "from": fmt_time(usage.first_time),
            "to": fmt_time(usage.last_time),
            "unknownGrants": dict(usage.unknown_grants),
        },
        "grants": [_grant_json(g) for g in review.grants],
        "deniedCallers": [
            {
                "issuer": c.identity[0],
                "subject": c.identity[1],
                "kind": c.identity[2],
                "lastDenied": fmt_time(c.denials.last_denied),
                **c.finding.detail,
            }
            for c in review.callers
        ],
        "deniedCallersNotTracked": usage.denied_callers_dropped,
    }


def _grant_json(g: GrantReview) -> dict[str, Any]:
    usage = g.usage
    return {
        "grant": g.key,
        "service": g.service,
        "requests": usage.requests,
        "firstUsed": fmt_time(usage.first_used),
        "lastUsed": fmt_time(usage.last_used),
        "mcpRequests": usage.mcp_requests,
        "rules": [
            {
                "methods": sorted(rule.methods),
                "paths": list(rule.paths),
                "mcp": rule.mcp is not None,
                "requests": ru.requests if rule.mcp is None else usage.mcp_requests,
                "lastUsed": fmt_time(ru.last_used),
                "methodsUsed": dict(ru.methods),
            }
            for rule, ru in zip(usage.grant.rules, usage.rules, strict=True)
        ],
        "findings": [{"kind": f.kind.value, "message": f.message, **f.detail} for f in g.findings],
        "action": "delete" if g.proposal is None else ("tighten" if g.changed else "keep"),
        "proposal": g.proposal,
        "diff": g.diff,
    }


def render_json(review: Review) -> str:
    """`--output json`."""
    return orjson.dumps(review_json(review), option=orjson.OPT_INDENT_2).decode() + "\n"


def render_yaml(review: Review) -> str:
    """`--output yaml`: the proposed grants that change, for `kubectl apply -f -`; grants to
    delete are listed as comments."""
    comments = [
        f"# {g.key} was not used: kubectl delete routegrant -n {g.grant.namespace} {g.grant.name}\n"
        for g in review.grants
        if g.proposal is None
    ]
    documents = [to_yaml(g.proposal) for g in review.grants if g.proposal is not None and g.changed]
    return "".join(comments) + "---\n".join(documents)
