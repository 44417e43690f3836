"""Pure aggregation of the proxies' usage reports into RouteGrant status (docs/usage.md).

Level-based, so neither a controller restart nor re-reading a Lease ever counts a request
twice: counts are recomputed from the reports every time (each replica's Lease carries its
hourly counts), and `lastUsed` is the maximum of what the reports say and what the status
already says, so it never moves backwards (not when a replica restarts, not when its Lease
is deleted, not when the window passes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nhigate.api import conditions as c
from nhigate.controller.status import condition, live_replicas
from nhigate.policy import Grant
from nhigate.policy.times import format_seconds, parse_optional
from nhigate.policy.usage import (
    MAX_SHAPES,
    USAGE_ANNOTATION,
    WINDOW_HOURS,
    RuleUse,
    UsageReport,
    UsageReportError,
    decode_report,
    rule_key,
    window_start_hour,
)

JSON = dict[str, Any]
WINDOW = f"{WINDOW_HOURS}h"


@dataclass(frozen=True, slots=True)
class Reports:
    """Every usage report of one ProtectedService's replicas."""

    reports: tuple[UsageReport, ...]
    readable: bool
    """False when a Lease carried an annotation that is not a report, or a live replica
    reported none (e.g. a proxy from before usage reporting, during an upgrade)."""

    @property
    def complete(self) -> bool:
        """Nothing was lost: every annotation was read and no report dropped anything."""
        return self.readable and all(r.complete for r in self.reports)


def read_reports(leases: Iterable[Mapping[str, Any]], now: float) -> Reports:
    """The usage reports on the service's Leases, live or stale (a replaced replica's
    counts still count until they leave the window)."""
    reports: list[UsageReport] = []
    readable = True
    for lease in leases:
        text = ((lease.get("metadata") or {}).get("annotations") or {}).get(USAGE_ANNOTATION)
        if not text:
            if live_replicas([lease], now):  # serving, but not reporting usage
                readable = False
            continue
        try:
            reports.append(decode_report(str(text)))
        except UsageReportError:
            readable = False
    return Reports(tuple(reports), readable)


def _in_window(use: RuleUse, first_hour: int) -> int:
    return sum(n for h, n in use.hours.items() if h >= first_hour)


def _later(a: str | None, b: float | None) -> str | None:
    """The later of an RFC 3339 time and epoch seconds, as RFC 3339."""
    known = parse_optional(a)
    if b is None or b <= 0:
        return a if known is not None else None
    if known is not None and known >= b:
        return a
    return format_seconds(b)


def grant_usage(
    grant: str,
    compiled: Grant | None,
    reports: Reports,
    previous: Mapping[str, Any] | None,
    now: float,
) -> JSON:
    """`status.usage` of one grant (`namespace/name`).

    `compiled` gives the grant's current rules (None when it is not in the policy: then
    only the grant-wide figures are reported). `previous` is the current `status.usage`.
    """
    first = window_start_hour(now)
    previous = previous or {}
    keys = [rule_key(i, r) for i, r in enumerate(compiled.rules)] if compiled else []
    previous_rules = {
        f"{r.get('index')}:{r.get('fingerprint')}": r for r in previous.get("rules") or ()
    }
    requests, last = 0, 0.0
    per_rule: dict[str, list[RuleUse]] = {k: [] for k in keys}
    for report in reports.reports:
        for key, use in (report.grants.get(grant) or {}).items():
            requests += _in_window(use, first)
            last = max(last, float(use.last_used))
            if key in per_rule:
                per_rule[key].append(use)
    rules: list[JSON] = []
    for index, key in enumerate(keys):
        uses = per_rule[key]
        shapes = sorted({s for u in uses for s in u.shapes})
        rule_last = max((float(u.last_used) for u in uses), default=None)
        entry: JSON = {
            "index": index,
            "fingerprint": key.partition(":")[2],
            "requests": sum(_in_window(u, first) for u in uses),
            "shapes": shapes[:MAX_SHAPES],
            "moreShapes": len(shapes) > MAX_SHAPES or any(u.more_shapes for u in uses),
        }
        when = _later((previous_rules.get(key) or {}).get("lastUsed"), rule_last)
        if when is not None:
            entry["lastUsed"] = when
        rules.append(entry)
    usage: JSON = {
        "requests": requests,
        "window": WINDOW,
        "rules": rules,
        "complete": reports.complete,
        "replicas": len(reports.reports),
    }
    when = _later(previous.get("lastUsed"), last)
    if when is not None:
        usage["lastUsed"] = when
    return usage


def grant_unused(
    last_used: str | None,
    created: float | None,
    idle_after: float,
    *,
    complete: bool,
    now: float,
) -> tuple[JSON, float | None]:
    """`Unused` for a grant, and when its answer next changes on its own (None: never).

    Idle means no allowed request for `idle_after` seconds since the last one, or since the
    grant was created if it never allowed one. Incomplete reports never make a grant idle.
    """
    used = parse_optional(last_used)
    since = used if used is not None else created
    period = f"{int(idle_after)}s"
    if since is None:
        return condition(
            c.UNUSED, c.UNKNOWN, c.REASON_USAGE_INCOMPLETE, "the grant's age is unknown"
        ), None
    idle_at = since + idle_after
    if now < idle_at:
        if used is not None:  # no time in the message: it must not change on every request
            message = f"used within the last {period} (status.usage.lastUsed)"
            return condition(c.UNUSED, False, c.REASON_USED, message), idle_at
        message = f"not used since its creation {format_seconds(since)}; idle after {period}"
        return condition(c.UNUSED, False, c.REASON_NOT_YET_IDLE, message), idle_at
    if not complete:
        message = "a proxy replica's usage report is incomplete: idleness is not claimed"
        return condition(c.UNUSED, c.UNKNOWN, c.REASON_USAGE_INCOMPLETE, message), None
    what = f"last used {format_seconds(used)}" if used is not None else "never used"
    message = f"{what}: no request allowed for {period} (since {format_seconds(since)})"
    return condition(c.UNUSED, True, c.REASON_IDLE, message), None


def usage_changed_materially(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> bool:
    """True for a change worth writing at once, whatever the write interval: the first use,
    a new rule used, or a change of completeness or of the rule list."""
    if before is None:
        return True
    if bool(before.get("lastUsed")) != bool(after.get("lastUsed")):
        return True
    if before.get("complete") != after.get("complete"):
        return True
    old: Sequence[Mapping[str, Any]] = before.get("rules") or ()
    new: Sequence[Mapping[str, Any]] = after.get("rules") or ()
    if [(r.get("index"), r.get("fingerprint")) for r in old] != [
        (r.get("index"), r.get("fingerprint")) for r in new
    ]:
        return True
    return any(
        bool(a.get("lastUsed")) != bool(b.get("lastUsed")) for a, b in zip(old, new, strict=True)
    )
