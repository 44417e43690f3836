"""RFC 3339 times as Kubernetes and people write them: whole seconds out, any offset in.

One home for the status, condition, report and CLI times. The policy document's own
canonical form (microseconds, `Z` only, strict) is `nhigate.policy.encoding.format_time` and
`parse_time`: a wire format, not a display one.
"""

from __future__ import annotations

from datetime import UTC, datetime


def format_seconds(epoch: float) -> str:
    """Epoch seconds -> RFC 3339 UTC, the fraction dropped (`2026-01-02T03:04:05Z`, metav1.Time)."""
    return datetime.fromtimestamp(int(epoch), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro(epoch: float) -> str:
    """Epoch seconds -> RFC 3339 UTC with microseconds (`...05.250000Z`, metav1.MicroTime)."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 with `Z` or an offset, any fraction (Time or MicroTime) -> epoch seconds.

    ValueError saying why for anything else, a time without an offset included.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time like 2026-01-02T03:04:05Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no offset: add a timezone, e.g. {text}Z")
    return moment.timestamp()


def parse_optional(text: str | None) -> float | None:
    """`parse_rfc3339` for fields the API server wrote: None when absent or not a time."""
    if not text:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None
