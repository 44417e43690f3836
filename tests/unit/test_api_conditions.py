"""set_condition moves lastTransitionTime only when the status changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nhigate.api import conditions as c

T0 = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def _set(
    existing: list[dict[str, object]] | None,
    status: str,
    reason: str,
    now: datetime,
    generation: int = 1,
    message: str = "m",
) -> list[dict[str, object]]:
    return c.set_condition(
        existing,
        type=c.READY,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
        now=now,
    )


def test_new_condition_gets_now_in_kubernetes_format() -> None:
    result = _set(None, c.TRUE, c.REASON_KEYS_LOADED, T0)
    assert result == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "KeysLoaded",
            "message": "m",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 1,
        }
    ]


def test_same_status_keeps_transition_time_but_refreshes_the_rest() -> None:
    first = _set(None, c.TRUE, c.REASON_KEYS_LOADED, T0)
    second = _set(first, c.TRUE, c.REASON_KEYS_LOADED, T1, generation=2, message="3 keys")
    assert second[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert second[0]["observedGeneration"] == 2
    assert second[0]["message"] == "3 keys"
    assert first[0]["message"] == "m", "input must not be modified"


def test_status_change_moves_transition_time() -> None:
    first = _set(None, c.TRUE, c.REASON_KEYS_LOADED, T0)
    second = _set(first, c.FALSE, c.REASON_FETCH_FAILED, T1)
    assert second[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert second[0]["reason"] == "FetchFailed"


def test_other_conditions_keep_their_order() -> None:
    start = [
        {
            "type": "A",
            "status": "True",
            "reason": "X",
            "message": "",
            "lastTransitionTime": "2020-01-01T00:00:00Z",
        }
    ]
    result = _set(start, c.UNKNOWN, c.REASON_RECONCILING, T0)
    assert [r["type"] for r in result] == ["A", "Ready"]
    assert result[0] == start[0]
    assert c.get_condition(result, "Ready") == result[1]
    assert c.get_condition(result, "Nope") is None
    assert c.is_true(result, "A")
    assert not c.is_true(result, "Ready")


@pytest.mark.parametrize(
    ("status", "reason"), [("true", "Ok"), ("True", ""), ("True", "not-camel")]
)
def test_bad_status_or_reason_is_refused(status: str, reason: str) -> None:
    with pytest.raises(ValueError, match="condition"):
        _set(None, status, reason, T0)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        _set(None, c.TRUE, "Ok", datetime(2026, 1, 1))


def test_long_messages_are_truncated_to_the_kubernetes_limit() -> None:
    result = _set(None, c.FALSE, c.REASON_ERROR, T0, message="x" * 40000)
    assert len(str(result[0]["message"])) == c.MAX_MESSAGE_LENGTH
