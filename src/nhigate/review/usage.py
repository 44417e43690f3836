"""Folding audit records into per-grant usage, in memory bounded by the policy, not the log.

Bounds (documented in docs/access-review.md, "Memory"):

- per grant: its rules x methods counters, one `PathShapes` (<= `shapes.MAX_NODES` nodes)
  per (rule, path pattern, method) seen, <= `MAX_IDENTITIES` distinct callers and a
  `TimeSeries` of <= `MAX_BUCKETS` buckets;
- denied callers: <= `MAX_DENIED_IDENTITIES`, each with <= `MAX_TRIED` distinct requests;
- grants named by the audit but not in the resources: <= `MAX_UNKNOWN_GRANTS` names;
- a cache of <= `MAX_CACHED_REQUESTS` (grant, method, path) already attributed, which
  makes the common repeated request a dictionary hit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from nhigate.policy import Grant, PathPattern
from nhigate.review.records import POLICY_ALLOWED_DENIALS, AuditRecord
from nhigate.review.shapes import PathShapes, is_identifier, shape_of

MAX_IDENTITIES = 256
MAX_DENIED_IDENTITIES = 4096
MAX_TRIED = 16
MAX_UNKNOWN_GRANTS = 256
MAX_BUCKETS = 240
MAX_CACHED_REQUESTS = 4096
FIRST_BUCKET_SECONDS = 60.0

IdentityKey = tuple[str | None, str | None, str | None]
"""(issuer, subject, kind) as the audit names a caller; all None when it did not authenticate."""


@dataclass(slots=True)
class TimeSeries:
    """Request counts in equal time buckets; the bucket width doubles to stay within bounds."""

    width: float = FIRST_BUCKET_SECONDS
    counts: dict[int, int] = field(default_factory=dict)
    _low: int = 0
    _high: int = -1

    def add(self, time: float) -> None:
        bucket = int(time // self.width)
        counts = self.counts
        if bucket in counts:
            counts[bucket] += 1
            return
        counts[bucket] = 1
        if self._high < self._low:
            self._low = self._high = bucket
            return
        self._low, self._high = min(self._low, bucket), max(self._high, bucket)
        while self._high - self._low >= MAX_BUCKETS:
            merged: dict[int, int] = {}
            for key, count in self.counts.items():
                merged[key // 2] = merged.get(key // 2, 0) + count
            self.counts = merged
            self.width *= 2
            self._low, self._high = self._low // 2, self._high // 2

    def points(self) -> list[tuple[float, int]]:
        """(bucket start in epoch seconds, count), in time order."""
        return [(b * self.width, c) for b, c in sorted(self.counts.items())]


@dataclass(slots=True)
class RuleUsage:
    """Use of one rule of a grant."""

    requests: int = 0
    last_used: float | None = None
    methods: Counter[str] = field(default_factory=Counter)
    shapes: dict[tuple[int, str], PathShapes] = field(default_factory=dict)
    """(path pattern index, method) -> the paths seen."""


@dataclass(slots=True)
class GrantUsage:
    """Use of one grant over the window."""

    grant: Grant
    patterns: list[list[PathPattern]]
    rules: list[RuleUsage]
    requests: int = 0
    first_used: float | None = None
    last_used: float | None = None
    mcp_requests: int = 0
    unmatched: int = 0
    """Requests the audit says this grant allowed that none of its rules matches today
    (the grant changed since): a proposal cannot keep them."""
    identities: Counter[IdentityKey] = field(default_factory=Counter)
    identities_complete: bool = True
    """False once more than `MAX_IDENTITIES` distinct callers were seen (subjects are then
    not judged unused)."""
    series: TimeSeries = field(default_factory=TimeSeries)

    by_shape: bool = False
    """Paths that differ only in identifier segments are attributed alike (see `shape_of`):
    true when no path pattern of the grant names an identifier literally, since then a
    pattern matches a path exactly when it matches its shape, and `PathShapes` records both
    the same way."""

    @classmethod
    def of(cls, grant: Grant) -> GrantUsage:
        patterns = [[PathPattern.compile(p) for p in rule.paths] for rule in grant.rules]
        by_shape = not any(
            is_identifier(segment) for rule in patterns for p in rule for segment in p.segments
        )
        rules = [RuleUsage() for _ in grant.rules]
        return cls(grant=grant, patterns=patterns, rules=rules, by_shape=by_shape)

    def _attribute(self, method: str, path: str) -> tuple[RuleUsage, PathShapes | None] | None:
        segments = path[1:].split("/")
        for index, (rule, patterns) in enumerate(zip(self.grant.rules, self.patterns, strict=True)):
            if rule.mcp is not None or ("*" not in rule.methods and method not in rule.methods):
                continue
            for position, pattern in enumerate(patterns):
                if pattern.matches_segments(segments):
                    usage = self.rules[index]
                    key = (position, method)
                    shapes = usage.shapes.get(key)
                    if shapes is None:
                        shapes = usage.shapes[key] = PathShapes(pattern)
                    if shapes.narrowable():
                        shapes.add(segments)
                    return usage, shapes
        return None


@dataclass(slots=True)
class DeniedCaller:
    """The denials of one caller."""

    denials: int = 0
    last_denied: float | None = None
    reasons: Counter[str] = field(default_factory=Counter)
    tried: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(method, path with ids as `*`) -> count, for the first `MAX_TRIED` distinct ones."""
    other_tried: int = 0
    grants: Counter[str] = field(default_factory=Counter)
    """Grants named by the denials (expired, not yet valid, tenant mismatch)."""


@dataclass(slots=True)
class Usage:
    """Everything the review learned from the audit."""

    grants: dict[str, GrantUsage]
    records: int = 0
    allowed: int = 0
    denied: int = 0
    first_time: float | None = None
    last_time: float | None = None
    unknown_grants: Counter[str] = field(default_factory=Counter)
    denied_callers: dict[IdentityKey, DeniedCaller] = field(default_factory=dict)
    denied_callers_dropped: int = 0
    """Denials of callers beyond the first `MAX_DENIED_IDENTITIES`."""


class UsageBuilder:
    """Add records one at a time; `usage` holds the result."""

    def __init__(self, grants: Iterable[Grant]) -> None:
        self.usage = Usage(grants={g.name: GrantUsage.of(g) for g in grants})
        self._cache: dict[tuple[str, str, str], tuple[RuleUsage, PathShapes | None] | None] = {}

    def add_all(self, records: Iterable[AuditRecord]) -> Usage:
        add = self.add
        for record in records:
            add(record)
        return self.usage

    def add(self, record: AuditRecord) -> None:
        usage = self.usage
        usage.records += 1
        time = record.time
        if usage.first_time is None or time < usage.first_time:
            usage.first_time = time
        if usage.last_time is None or time > usage.last_time:
            usage.last_time = time
        if record.decision == "allow" or record.reason in POLICY_ALLOWED_DENIALS:
            usage.allowed += 1
            self._add_use(record)
        else:
            usage.denied += 1
            self._add_denial(record)

    def _add_use(self, record: AuditRecord) -> None:
        name = record.grant
        usage = self.usage
        grant = usage.grants.get(name) if name is not None else None
        if grant is None:
            unknown = usage.unknown_grants
            label = name or "(none)"
            if label in unknown or len(unknown) < MAX_UNKNOWN_GRANTS:
                unknown[label] += 1
            return
        time = record.time
        grant.requests += 1
        if grant.first_used is None or time < grant.first_used:
            grant.first_used = time
        if grant.last_used is None or time > grant.last_used:
            grant.last_used = time
        grant.series.add(time)
        identity = (record.issuer, record.subject, record.kind)
        identities = grant.identities
        if identity in identities or len(identities) < MAX_IDENTITIES:
            identities[identity] += 1
        else:
            grant.identities_complete = False
        if record.mcp:
            grant.mcp_requests += 1
            return
        method, path = record.method, record.path
        cache = self._cache
        request = (grant.grant.name, method, path)
        if request in cache:
            hit = cache[request]
        else:
            if grant.by_shape:
                request = (grant.grant.name, method, shape_of(path))
            if request in cache:
                hit = cache[request]
            else:
                hit = grant._attribute(method, path)
                if len(cache) >= MAX_CACHED_REQUESTS:
                    cache.clear()
                cache[request] = hit
        if hit is None:
            grant.unmatched += 1
            return
        rule = hit[0]
        rule.requests += 1
        rule.methods[method] += 1
        if rule.last_used is None or time > rule.last_used:
            rule.last_used = time

    def _add_denial(self, record: AuditRecord) -> None:
        key = (record.issuer, record.subject, record.kind)
        callers = self.usage.denied_callers
        caller = callers.get(key)
        if caller is None:
            if len(callers) >= MAX_DENIED_IDENTITIES:
                self.usage.denied_callers_dropped += 1
                return
            caller = callers[key] = DeniedCaller()
        caller.denials += 1
        if caller.last_denied is None or record.time > caller.last_denied:
            caller.last_denied = record.time
        caller.reasons[record.reason] += 1
        tried = (record.method, shape_of(record.path))
        if tried in caller.tried or len(caller.tried) < MAX_TRIED:
            caller.tried[tried] += 1
        else:
            caller.other_tried += 1
        grant = record.grant
        if grant is not None and (grant in caller.grants or len(caller.grants) < MAX_TRIED):
            caller.grants[grant] += 1


def build_usage(grants: Iterable[Grant], records: Iterable[AuditRecord]) -> Usage:
    """The usage of `grants` in `records` (one pass, bounded memory)."""
    return UsageBuilder(grants).add_all(records)
