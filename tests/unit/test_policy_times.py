"""nhigate.policy.times: the one reading and writing of RFC 3339 outside the policy document."""

from __future__ import annotations

import pytest

from nhigate.policy.times import format_seconds, parse_optional, parse_rfc3339

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_whole_seconds_out_any_fraction_in() -> None:
    assert format_seconds(NOW) == "2027-01-15T08:00:00Z"
    assert format_seconds(NOW + 0.999) == "2027-01-15T08:00:00Z"  # dropped, never rounded up
    assert parse_rfc3339(format_seconds(NOW)) == NOW
    assert parse_rfc3339("2027-01-15T08:00:00.5Z") == NOW + 0.5
    assert parse_rfc3339("2027-01-15T08:00:00.000000Z") == NOW  # MicroTime, as Leases carry
    assert parse_rfc3339("2027-01-15T10:00:00+02:00") == NOW


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2027-01-15T08:00:00", "no offset"),
        ("2027-01-15", "no offset"),
        ("yesterday", "not an RFC 3339 time"),
        ("2027-02-30T08:00:00Z", "not an RFC 3339 time"),
        ("", "not an RFC 3339 time"),
    ],
)
def test_anything_else_is_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_rfc3339(text)


def test_optional_fields_read_as_none_when_absent_or_not_a_time() -> None:
    assert parse_optional("2027-01-15T08:00:00Z") == NOW
    assert parse_optional(None) is None
    assert parse_optional("") is None
    assert parse_optional("yesterday") is None
    assert parse_optional("2027-01-15T08:00:00") is None
