"""Audit-line times: the fast hour-cached reading agrees with `policy.times`, refuses as it does."""

from __future__ import annotations

import io

import orjson
import pytest

from nhigate.policy.times import parse_rfc3339
from nhigate.review.records import ReadStats, read_records


def _line(time: str) -> bytes:
    record = {
        "time": time,
        "decision": "deny",
        "reason": "no_matching_grant",
        "identity": None,
        "grant": None,
        "method": "GET",
        "path": "/",
    }
    return orjson.dumps(record) + b"\n"


def _read(*times: str) -> tuple[list[float], ReadStats]:
    stats = ReadStats()
    lines = b"".join(_line(t) for t in times)
    return [r.time for r in read_records([io.BytesIO(lines)], stats)], stats


def test_times_in_one_hour_and_across_hours_read_as_policy_times_does() -> None:
    times = [
        "2026-05-01T00:00:00Z",
        "2026-05-01T00:59:59.250000Z",
        "2026-05-01T01:00:00.5Z",
        "2026-05-01T03:00:00+02:00",  # another offset: the exact path
        "2026-12-31T23:59:59Z",
    ]
    read, stats = _read(*times)
    assert read == [parse_rfc3339(t) for t in times]
    assert stats.malformed == 0


@pytest.mark.parametrize(
    "time",
    ["2026-05-01T00:00:00", "2026-05-01T00:00:00.5", "2026-05-01T00:00:00.5Zjunk", "yesterday"],
)
def test_a_time_without_an_offset_is_malformed_not_local_time(time: str) -> None:
    read, stats = _read("2026-05-01T00:00:00Z", time)
    assert read == [parse_rfc3339("2026-05-01T00:00:00Z")]
    assert stats.malformed == 1
