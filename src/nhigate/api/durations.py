"""Durations as written in the custom resources: "30s", "15m", "1h30m", "250ms"."""

from __future__ import annotations

import re
from datetime import timedelta

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
"""The schema pattern every duration field carries (also used by the CRDs)."""

_DURATION = re.compile(DURATION_PATTERN)
_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``"1h30m"`` into a `timedelta`; raise ValueError if malformed."""
    if not isinstance(text, str) or _DURATION.fullmatch(text) is None:
        raise ValueError(f"invalid duration {text!r}: expected e.g. '30s', '15m', '1h30m'")
    millis = 0
    for amount, unit in _PART.findall(text):
        millis += int(amount) * int(_UNIT_SECONDS[unit] * 1000)
    return timedelta(milliseconds=millis)


def duration_seconds(text: str) -> int:
    """Whole seconds in a duration, rounded up (so a non-zero duration is never 0)."""
    delta = parse_duration(text)
    whole = int(delta.total_seconds())
    return whole + 1 if delta > timedelta(seconds=whole) else whole
