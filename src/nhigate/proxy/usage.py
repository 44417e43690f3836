"""Per-replica grant usage: what this process allowed, per grant and rule (docs/usage.md).

`UsageRecorder.record` is called once per allowed request (after its audit line); the
`LeaseReporter` publishes `report()` on this replica's Lease. Memory is bounded: at most
`max_rules` (grant, rule) entries (default `MAX_TRACKED_RULES`), each with at most
`WINDOW_HOURS` hourly counts and `MAX_SHAPES` shapes of at most `MAX_SHAPE_LENGTH`
characters. When the table is full, entries with no count left in the window make room;
if none can, the request is not tracked and reports say `complete=False` for a window (so
the controller never calls a grant unused from a report that lost something).

On start, the reporter hands the previous process's report from the same Lease to `adopt`,
so a restarted replica carries its counts on instead of restarting from zero or adding
them twice.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from nhigate.policy import PathPattern, Policy
from nhigate.policy.usage import (
    HOUR,
    MAX_SHAPES,
    WINDOW_HOURS,
    RuleUse,
    UsageReport,
    merge_uses,
    path_shape,
    rule_key,
    window_start_hour,
)

MAX_TRACKED_RULES = 4096
"""(grant, rule) entries one replica tracks: about 2.5 KiB each at worst, so < 12 MiB."""
UNMATCHED_RULE = "-"
"""Rule key for an allowed request no rule of the grant explains (never expected)."""


@dataclass(slots=True)
class _Entry:
    last_used: int = 0
    hours: dict[int, int] = field(default_factory=dict)
    shapes: list[str] = field(default_factory=list)
    more_shapes: bool = False
    last_method: str = ""
    last_path: str = ""
    """The request last counted here: its shape is already among `shapes` (or was refused
    for want of room), so a client repeating one request does not fold its path again."""


_RuleMatcher = tuple[
    tuple[str, frozenset[str], tuple[PathPattern, ...], tuple[str, ...] | None], ...
]
"""Per rule: (key, methods, path patterns, MCP endpoints or None for an HTTP rule)."""


class UsageRecorder:
    """Counts allowed requests per grant and rule, within fixed bounds."""

    def __init__(self, *, max_rules: int = MAX_TRACKED_RULES, complete: bool = True) -> None:
        self.instance = secrets.token_hex(6)
        self._max_rules = max_rules
        self._complete = complete
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._overflow_at: float | None = None
        self._version: str | None = None
        self._positions: dict[str, int] = {}
        self._matchers: dict[str, _RuleMatcher] = {}
        self.untracked = 0
        """Requests not tracked because the table was full (since start)."""
        self.revision = 0
        """Changes since start: a report is the same while this and the hour stay the same."""

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, policy: Policy, grant: str, method: str, path: str, now: float) -> None:
        """One allowed request of `grant` (`method` and the canonical `path` it was allowed on)."""
        self.revision += 1
        key = (grant, self._rule_key(policy, grant, method, path))
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_rules and not self._make_room(now):
                self._overflow_at = now
                self.untracked += 1
                return
            entry = self._entries[key] = _Entry()
        hour = int(now) // HOUR
        entry.hours[hour] = entry.hours.get(hour, 0) + 1
        if int(now) > entry.last_used:
            entry.last_used = int(now)
        if path == entry.last_path and method == entry.last_method:
            return
        entry.last_method = method
        entry.last_path = path
        if len(entry.shapes) < MAX_SHAPES or not entry.more_shapes:
            shape = path_shape(method, path)
            if shape not in entry.shapes:
                if len(entry.shapes) < MAX_SHAPES:
                    entry.shapes.append(shape)
                else:
                    entry.more_shapes = True

    def report(self, now: float) -> UsageReport:
        """What to publish now (hours outside the window are dropped first)."""
        first = window_start_hour(now)
        grants: dict[str, dict[str, RuleUse]] = {}
        for (grant, key), entry in self._entries.items():
            for hour in [h for h in entry.hours if h < first]:
                del entry.hours[hour]
            grants.setdefault(grant, {})[key] = RuleUse(
                last_used=entry.last_used,
                hours=dict(entry.hours),
                shapes=tuple(entry.shapes),
                more_shapes=entry.more_shapes,
            )
        overflowed = self._overflow_at is not None and now - self._overflow_at < WINDOW_HOURS * HOUR
        return UsageReport(self.instance, grants, complete=self._complete and not overflowed)

    def adopt(self, previous: UsageReport, now: float) -> None:
        """Carry on a previous process's report for this replica (once, at start).

        A recorder created incomplete (several worker processes sharing one Lease) adopts
        nothing: the report on the Lease may be a sibling's, and adding it would count twice.
        """
        if previous.instance == self.instance or not self._complete:
            return
        self.revision += 1
        if not previous.complete:
            self._overflow_at = now  # what it lost stays lost: say so for a window
        for grant, rules in previous.grants.items():
            for key, use in rules.items():
                entry = self._entries.get((grant, key))
                if entry is None and len(self._entries) >= self._max_rules:
                    self._overflow_at = now
                    continue
                mine = (
                    RuleUse(entry.last_used, entry.hours, tuple(entry.shapes), entry.more_shapes)
                    if entry is not None
                    else RuleUse(0, {})
                )
                merged = merge_uses(mine, use, now)
                self._entries[(grant, key)] = _Entry(
                    merged.last_used, dict(merged.hours), list(merged.shapes), merged.more_shapes
                )

    def _make_room(self, now: float) -> bool:
        first = window_start_hour(now)
        idle = [
            (e.last_used, k)
            for k, e in self._entries.items()
            if not any(h >= first for h in e.hours)
        ]
        if not idle:
            return False
        del self._entries[min(idle)[1]]
        return True

    def _rule_key(self, policy: Policy, grant: str, method: str, path: str) -> str:
        if policy.version != self._version:
            self._version = policy.version
            self._positions = {g.name: i for i, g in enumerate(policy.grants)}
            self._matchers = {}
        matcher = self._matchers.get(grant)
        if matcher is None:
            pos = self._positions.get(grant)
            if pos is None:
                return UNMATCHED_RULE
            rules = policy.grants[pos].rules
            matcher = self._matchers[grant] = tuple(
                (
                    rule_key(i, rule),
                    rule.methods,
                    tuple(map(PathPattern.compile, rule.paths)),
                    None if rule.mcp is None else rule.mcp.endpoints,
                )
                for i, rule in enumerate(rules)
            )
        if len(matcher) == 1:  # the grant allowed the request, so its one rule did
            return matcher[0][0]
        for key, methods, patterns, endpoints in matcher:
            if endpoints is None:
                if ("*" in methods or method in methods) and any(p.matches(path) for p in patterns):
                    return key
            elif not endpoints or path in endpoints:
                return key
        return UNMATCHED_RULE
