"""Reading the proxy's audit JSON lines (docs/operations.md, "Audit log"), one at a time.

The input is streamed: one line in memory at a time, so memory does not grow with the
number of lines. Gzip is recognised by its magic bytes, whatever the file is called.
A line that is not an audit record is counted, never fatal: a log cut off mid-line
or interleaved with other output should still be reviewable.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple, cast

import orjson

from nhigate.policy.paths import is_canonical_path
from nhigate.policy.times import parse_rfc3339

GZIP_MAGIC = b"\x1f\x8b"
POLICY_ALLOWED_DENIALS = frozenset({"rate_limited"})
"""Denials of requests the policy allowed (a grant matched): they count as use of the grant."""
MALFORMED_EXAMPLES = 5
"""How many malformed line numbers a `ReadStats` keeps, to point at them."""


class AuditRecord(NamedTuple):
    """The fields of one audit record the review uses (a tuple: a million are made)."""

    time: float
    """Epoch seconds."""
    decision: str
    """`allow` or `deny`."""
    reason: str
    grant: str | None
    method: str
    path: str
    issuer: str | None
    """The IdentityIssuer name ("" for SPIFFE); None when the caller did not authenticate."""
    subject: str | None
    kind: str | None
    tenant: str | None = None
    mcp: bool = False
    """True on MCP endpoints (the record has an `mcp` object)."""
    actors: tuple[str, ...] = ()


@dataclass(slots=True)
class ReadStats:
    """What reading the audit saw besides the records."""

    lines: int = 0
    records: int = 0
    malformed: int = 0
    malformed_lines: list[int] = field(default_factory=list)
    """The first `MALFORMED_EXAMPLES` malformed line numbers (1-based, across all inputs)."""

    def note_malformed(self) -> None:
        self.malformed += 1
        if len(self.malformed_lines) < MALFORMED_EXAMPLES:
            self.malformed_lines.append(self.lines)


def open_audit(stream: BinaryIO) -> BinaryIO:
    """`stream`, decompressed when it starts with the gzip magic bytes."""
    buffered = (
        stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(cast(Any, stream))
    )
    if buffered.peek(2)[:2] == GZIP_MAGIC:
        return cast(BinaryIO, gzip.GzipFile(fileobj=buffered, mode="rb"))
    return cast(BinaryIO, buffered)


class _Clock:
    """RFC 3339 UTC times to epoch seconds, caching the hour (lines come in time order)."""

    __slots__ = ("_epoch", "_hour")

    def __init__(self) -> None:
        self._hour = ""
        self._epoch = 0.0

    def epoch(self, text: str) -> float:
        hour = text[:13]  # 2026-11-23T17
        if hour != self._hour:
            base = parse_rfc3339(hour + ":00:00Z")
            self._hour, self._epoch = hour, base
        rest = text[19:]
        if text[13] == ":" and text[16] == ":" and (rest == "Z" or rest[:1] == "."):
            seconds = int(text[14:16]) * 60 + int(text[17:19])
            if rest == "Z":
                return self._epoch + seconds
            if rest[-1:] == "Z" and rest[1:-1].isdigit():
                return self._epoch + seconds + float("0" + rest[:-1])
        return parse_rfc3339(text)  # another offset: the slow, exact way (no offset: refused)


_STRINGS = (str, str, str)


def parse_record(line: bytes, clock: _Clock) -> AuditRecord | None:
    """One audit line, or None when it is not an audit record."""
    try:
        raw = orjson.loads(line)
        identity = raw["identity"]
        if identity is None:
            issuer = subject = kind = None
            actors: tuple[str, ...] = ()
        else:
            issuer, subject, kind = identity["issuer"], identity["subject"], identity["kind"]
            actors = tuple(identity["actors"]) if "actors" in identity else ()
        decision, reason, method, path = raw["decision"], raw["reason"], raw["method"], raw["path"]
        if decision not in ("allow", "deny") or (type(reason), type(method), type(path)) != (
            _STRINGS
        ):
            return None
        if (decision == "allow" or reason in POLICY_ALLOWED_DENIALS) and not is_canonical_path(
            path
        ):
            return None  # the proxy only allows canonical paths: a forged or corrupt line
        return AuditRecord(
            clock.epoch(raw["time"]),
            decision,
            reason,
            raw.get("grant"),
            method,
            path,
            issuer,
            subject,
            kind,
            raw.get("tenant"),
            "mcp" in raw,
            actors,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None


def read_records(streams: Iterable[BinaryIO], stats: ReadStats) -> Iterator[AuditRecord]:
    """Every audit record of `streams`, in order; counts lines and malformed ones in `stats`."""
    clock = _Clock()
    for stream in streams:
        for line in open_audit(stream):
            stats.lines += 1
            if not line.strip():
                continue
            record = parse_record(line, clock)
            if record is None:
                stats.note_malformed()
                continue
            stats.records += 1
            yield record
