"""Grant usage as a proxy replica reports it (docs/usage.md): the shared, pure format.

Each replica counts, per grant and per rule, the requests it allowed in whole UTC hours,
the last time it allowed one and the distinct method + path *shapes* it saw (identifiers
folded to `*`), and publishes the lot as one annotation on the Lease it already renews
(`USAGE_ANNOTATION`: gzipped JSON, base64). The controller sums the replicas' reports into
RouteGrant status. Everything here is pure and bounded:

- `WINDOW_HOURS` hours of counts per rule (older hours are dropped);
- `MAX_SHAPES` shapes per rule, each at most `MAX_SHAPE_LENGTH` characters;
- `MAX_REPORT_BYTES` per encoded report: shapes are dropped first, then the least recently
  used rules, and a report that lost anything says so (`complete=False`).

A rule is named by its position and a fingerprint of its content (`rule_key`), so editing
or reordering a grant's rules never credits a new rule with an old rule's use.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from nhigate.policy.model import Rule

USAGE_ANNOTATION = "nhigate.io/usage"
"""The Lease annotation holding a replica's encoded `UsageReport`."""
HOUR = 3600
WINDOW_HOURS = 24
"""Hours of request counts kept and reported: the current UTC hour and the 23 before it."""
MAX_SHAPES = 8
"""Distinct method + path shapes kept per rule (further ones set `more_shapes`)."""
MAX_SHAPE_LENGTH = 160
MAX_REPORT_BYTES = 64 * 1024
"""Largest encoded report (Lease annotations share a 256 KiB limit)."""
_MAX_DECODED_BYTES = 8 * 1024 * 1024
_FORMAT = 1

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_HEXISH = re.compile(r"^(?=.*[0-9])[0-9a-fA-F]{8,}$")


class UsageReportError(ValueError):
    """An annotation that is not a usage report this version understands."""


@dataclass(frozen=True, slots=True)
class RuleUse:
    """What one replica saw of one rule of one grant."""

    last_used: int
    """Epoch seconds of the last allowed request."""
    hours: Mapping[int, int]
    """UTC hour (epoch seconds // 3600) -> requests allowed in it; only the window's hours."""
    shapes: tuple[str, ...] = ()
    """Distinct `METHOD /path/shape` seen, in the order first seen (at most MAX_SHAPES)."""
    more_shapes: bool = False
    """More shapes were seen than are kept (or they were dropped to fit the report)."""


@dataclass(frozen=True, slots=True)
class UsageReport:
    """One replica's usage: grant (`namespace/name`) -> rule key -> use."""

    instance: str
    """The reporting process (new on every start), for the controller's logs and tests."""
    grants: Mapping[str, Mapping[str, RuleUse]]
    complete: bool = True
    """False when something was dropped (bounds, workers sharing a Lease): the counts are a
    lower bound and no grant may be called unused from this report."""


def rule_key(index: int, rule: Rule) -> str:
    """`<index>:<fingerprint>`: a rule's position and a digest of what it allows."""
    mcp = rule.mcp
    content = [
        sorted(rule.methods),
        list(rule.paths),
        None
        if mcp is None
        else [list(mcp.endpoints), list(mcp.tools), list(mcp.resources), list(mcp.prompts)],
    ]
    digest = hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()
    return f"{index}:{digest[:10]}"


def _fold(segment: str) -> str:
    if len(segment) < 8:  # the common case, without a regex
        return "*" if segment.isdigit() else segment
    if len(segment) > 40 or segment.isdigit() or _UUID.match(segment) or _HEXISH.match(segment):
        return "*"
    return segment


def path_shape(method: str, path: str) -> str:
    """`METHOD /path` with identifier-like segments (numbers, UUIDs, long hex, very long
    segments) folded to `*`, cut to MAX_SHAPE_LENGTH: `GET /v1/items/*/history`."""
    return f"{method} {'/'.join(map(_fold, path.split('/')))}"[:MAX_SHAPE_LENGTH]


def window_start_hour(now: float) -> int:
    """The oldest UTC hour still inside the window at `now`."""
    return int(now) // HOUR - (WINDOW_HOURS - 1)


def merge_uses(a: RuleUse, b: RuleUse, now: float) -> RuleUse:
    """Two observations of the same rule added together (hours summed, shapes united)."""
    first = window_start_hour(now)
    hours = {h: n for h, n in a.hours.items() if h >= first}
    for h, n in b.hours.items():
        if h >= first:
            hours[h] = hours.get(h, 0) + n
    shapes = list(a.shapes)
    for shape in b.shapes:
        if shape not in shapes:
            shapes.append(shape)
    return RuleUse(
        last_used=max(a.last_used, b.last_used),
        hours=hours,
        shapes=tuple(shapes[:MAX_SHAPES]),
        more_shapes=a.more_shapes or b.more_shapes or len(shapes) > MAX_SHAPES,
    )


def _to_json(report: UsageReport) -> bytes:
    grants = {
        grant: {
            key: [use.last_used, sorted(use.hours.items()), list(use.shapes), use.more_shapes]
            for key, use in rules.items()
        }
        for grant, rules in report.grants.items()
    }
    body = {"v": _FORMAT, "i": report.instance, "c": report.complete, "g": grants}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def _pack(report: UsageReport) -> str:
    return base64.b64encode(gzip.compress(_to_json(report), compresslevel=6, mtime=0)).decode(
        "ascii"
    )


def encode_report(report: UsageReport, max_bytes: int = MAX_REPORT_BYTES) -> str:
    """The annotation value; shrunk to `max_bytes` (shapes first, then the least recently
    used rules), marked incomplete when anything was dropped."""
    packed = _pack(report)
    if len(packed) <= max_bytes:
        return packed
    shapeless = {
        g: {
            k: replace(u, shapes=(), more_shapes=bool(u.shapes) or u.more_shapes)
            for k, u in rules.items()
        }
        for g, rules in report.grants.items()
    }
    report = replace(report, grants=shapeless, complete=False)
    entries = sorted(
        ((u.last_used, g, k, u) for g, rules in shapeless.items() for k, u in rules.items()),
        key=lambda e: e[0],
        reverse=True,
    )
    keep = len(entries)
    while True:
        packed = _pack(report)
        if len(packed) <= max_bytes or keep == 0:
            return packed
        # Aim below the limit in proportion (a few passes at most, not one per halving).
        keep = min(keep - 1, int(keep * max_bytes / len(packed) * 0.9))
        kept: dict[str, dict[str, RuleUse]] = {}
        for _, g, k, u in entries[: max(keep, 0)]:
            kept.setdefault(g, {})[k] = u
        report = replace(report, grants=kept)


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    out = inflater.decompress(data, _MAX_DECODED_BYTES)
    if inflater.unconsumed_tail:
        raise UsageReportError("usage report too large")
    return out


def decode_report(text: str) -> UsageReport:
    """Parse an annotation value; raises `UsageReportError` for anything else."""
    try:
        raw = json.loads(_inflate(base64.b64decode(text, validate=True)))
    except (binascii.Error, zlib.error, EOFError, ValueError) as exc:
        if isinstance(exc, UsageReportError):
            raise
        raise UsageReportError(f"not a usage report: {exc}") from None
    if not isinstance(raw, dict) or raw.get("v") != _FORMAT:
        raise UsageReportError("unknown usage report format")
    instance, complete, grants = raw.get("i"), raw.get("c"), raw.get("g")
    if not isinstance(instance, str) or not isinstance(complete, bool):
        raise UsageReportError("usage report without instance or completeness")
    if not isinstance(grants, dict):
        raise UsageReportError("usage report without grants")
    parsed: dict[str, dict[str, RuleUse]] = {}
    for grant, rules in grants.items():
        if not isinstance(rules, dict):
            raise UsageReportError(f"usage of {grant!r} is not an object")
        parsed[str(grant)] = {str(key): _rule_use(value) for key, value in rules.items()}
    return UsageReport(instance=instance, grants=parsed, complete=complete)


def _rule_use(value: object) -> RuleUse:
    if not isinstance(value, list) or len(value) != 4:
        raise UsageReportError("a rule's usage is not [lastUsed, hours, shapes, more]")
    last_used, hours, shapes, more = value
    if (
        not _count(last_used)
        or not isinstance(hours, list)
        or not all(isinstance(h, list) and len(h) == 2 and all(map(_count, h)) for h in hours)
        or not isinstance(shapes, list)
        or not all(isinstance(s, str) for s in shapes)
        or not isinstance(more, bool)
    ):
        raise UsageReportError("malformed rule usage")
    return RuleUse(
        last_used=last_used,
        hours={h: n for h, n in hours},
        shapes=tuple(s[:MAX_SHAPE_LENGTH] for s in shapes[:MAX_SHAPES]),
        more_shapes=more or len(shapes) > MAX_SHAPES,
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
