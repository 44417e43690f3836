"""The usage report format and the controller's pure aggregation into RouteGrant status."""

from __future__ import annotations

import base64
import gzip
import random
from typing import Any

import pytest

from nhigate.controller.usage import (
    Reports,
    grant_unused,
    grant_usage,
    read_reports,
    usage_changed_materially,
)
from nhigate.policy import Grant, Rule, TokenSubject
from nhigate.policy.usage import (
    HOUR,
    MAX_REPORT_BYTES,
    USAGE_ANNOTATION,
    WINDOW_HOURS,
    RuleUse,
    UsageReport,
    UsageReportError,
    decode_report,
    encode_report,
    path_shape,
    rule_key,
)

NOW = 1_900_000_000.0
HOUR_NOW = int(NOW) // HOUR
GRANT = Grant(
    name="ns/g",
    subjects=(TokenSubject(issuer="ci", subject="s"),),
    rules=(
        Rule(methods=frozenset({"GET"}), paths=("/v1/items/**",)),
        Rule(methods=frozenset({"POST"}), paths=("/v1/orders",)),
    ),
)
K0, K1 = rule_key(0, GRANT.rules[0]), rule_key(1, GRANT.rules[1])


def _report(instance: str, uses: dict[str, RuleUse], complete: bool = True) -> UsageReport:
    return UsageReport(instance, {"ns/g": uses}, complete)


def _lease(report: UsageReport | str) -> dict[str, Any]:
    text = report if isinstance(report, str) else encode_report(report)
    return {"metadata": {"annotations": {USAGE_ANNOTATION: text}}}


@pytest.mark.parametrize(
    ("method", "path", "shape"),
    [
        ("GET", "/v1/items/42", "GET /v1/items/*"),
        ("GET", "/v1/items/5f0c3a9e-1b2d-4c3e-9f00-123456789abc/x", "GET /v1/items/*/x"),
        ("PUT", "/v1/blobs/deadbeef01", "PUT /v1/blobs/*"),
        ("GET", "/v1/items/summary", "GET /v1/items/summary"),
        ("GET", "/", "GET /"),
    ],
)
def test_path_shapes_fold_identifiers(method: str, path: str, shape: str) -> None:
    assert path_shape(method, path) == shape


def test_rule_keys_follow_position_and_content() -> None:
    same = Rule(methods=frozenset({"GET"}), paths=("/v1/items/**",))
    assert rule_key(0, same) == K0
    assert rule_key(1, same) != K0
    assert rule_key(0, Rule(methods=frozenset({"GET", "HEAD"}), paths=("/v1/items/**",))) != K0


def test_reports_round_trip_and_garbage_is_refused() -> None:
    report = _report("a", {K0: RuleUse(int(NOW), {HOUR_NOW: 3}, ("GET /v1/items/*",), True)})
    assert decode_report(encode_report(report)) == report
    for bad in ("not base64!", base64.b64encode(b"plain").decode(), ""):
        with pytest.raises(UsageReportError):
            decode_report(bad)
    bomb = base64.b64encode(gzip.compress(b"[" + b" " * (20 * 1024 * 1024) + b"]")).decode()
    with pytest.raises(UsageReportError):
        decode_report(bomb)


def test_an_oversized_report_is_shrunk_and_marked_incomplete() -> None:
    rng = random.Random(14)  # varied counts: gzip must not squeeze them all in
    grants = {
        f"ns/grant-{i}": {
            f"{j}:{rng.getrandbits(40):010x}": RuleUse(
                int(NOW) - i,
                {HOUR_NOW - h: rng.randrange(1 << 20) for h in range(WINDOW_HOURS)},
                tuple(f"GET /v1/{rng.getrandbits(64):x}" for _ in range(8)),
            )
            for j in range(8)
        }
        for i in range(600)
    }
    text = encode_report(UsageReport("a", grants))
    assert len(text) <= MAX_REPORT_BYTES
    shrunk = decode_report(text)
    assert not shrunk.complete
    assert "ns/grant-0" in shrunk.grants  # the most recently used are kept


def test_counts_are_summed_across_replicas_and_re_reading_never_doubles() -> None:
    leases = [
        _lease(_report("a", {K0: RuleUse(int(NOW) - 10, {HOUR_NOW: 3, HOUR_NOW - 1: 2})})),
        _lease(_report("b", {K0: RuleUse(int(NOW) - 5, {HOUR_NOW: 4}), K1: RuleUse(100, {})})),
    ]
    first = grant_usage("ns/g", GRANT, read_reports(leases, NOW), None, NOW)
    assert first["requests"] == 9
    assert first["replicas"] == 2
    assert first["complete"] is True
    assert first["lastUsed"] == "2030-03-17T17:46:35Z"
    assert [r["requests"] for r in first["rules"]] == [9, 0]
    assert first["window"] == f"{WINDOW_HOURS}h"
    again = grant_usage("ns/g", GRANT, read_reports(leases, NOW), first, NOW)
    assert again == first  # level-based: the same Leases give the same status


def test_hours_leave_the_window() -> None:
    old = HOUR_NOW - WINDOW_HOURS
    reports = read_reports([_lease(_report("a", {K0: RuleUse(old * HOUR, {old: 50})}))], NOW)
    usage = grant_usage("ns/g", GRANT, reports, None, NOW)
    assert usage["requests"] == 0
    assert "lastUsed" in usage  # last use is kept after its count left the window


def test_last_used_never_moves_backwards() -> None:
    previous = grant_usage(
        "ns/g",
        GRANT,
        read_reports([_lease(_report("a", {K0: RuleUse(int(NOW), {HOUR_NOW: 1})}))], NOW),
        None,
        NOW,
    )
    # The replica restarted with nothing carried on, or its Lease was deleted.
    for reports in (read_reports([_lease(_report("b", {}))], NOW), read_reports([], NOW)):
        later = grant_usage("ns/g", GRANT, reports, previous, NOW + 60)
        assert later["lastUsed"] == previous["lastUsed"]
        assert later["rules"][0]["lastUsed"] == previous["rules"][0]["lastUsed"]


def test_a_changed_rule_starts_without_usage() -> None:
    reports = read_reports([_lease(_report("a", {K0: RuleUse(int(NOW), {HOUR_NOW: 1})}))], NOW)
    previous = grant_usage("ns/g", GRANT, reports, None, NOW)
    edited = Grant(
        name="ns/g",
        subjects=GRANT.subjects,
        rules=(Rule(methods=frozenset({"DELETE"}), paths=("/v1/items/**",)), GRANT.rules[1]),
    )
    usage = grant_usage("ns/g", edited, reports, previous, NOW)
    assert usage["rules"][0]["requests"] == 0
    assert "lastUsed" not in usage["rules"][0]
    assert usage["lastUsed"] == previous["lastUsed"]  # the grant itself was used
    assert usage_changed_materially(previous, usage)


def test_an_unreadable_or_incomplete_report_makes_usage_incomplete() -> None:
    assert not read_reports([_lease("garbage")], NOW).complete
    assert not read_reports([_lease(_report("a", {}, complete=False))], NOW).complete
    assert read_reports([{"metadata": {}}], NOW) == Reports((), True)  # stale: ignored
    live = {
        "metadata": {"annotations": {"nhigate.io/policy-version": "v1"}},
        "spec": {"leaseDurationSeconds": 15, "renewTime": "2030-03-17T17:46:35.000000Z"},
    }
    assert not read_reports([live], NOW).complete  # a live replica that reports no usage


@pytest.mark.parametrize(
    ("last_used", "created", "complete", "status", "reason"),
    [
        ("2030-03-17T17:00:00Z", NOW - 10 * HOUR, True, "False", "Used"),
        ("2030-03-17T10:00:00Z", NOW - 10 * HOUR, True, "True", "Idle"),
        (None, NOW - 60, True, "False", "NotYetIdle"),
        (None, NOW - 3 * HOUR, True, "True", "Idle"),
        (None, NOW - 3 * HOUR, False, "Unknown", "UsageIncomplete"),
        ("2030-03-17T17:00:00Z", NOW - 10 * HOUR, False, "False", "Used"),
    ],
)
def test_unused_after_the_idle_period(
    last_used: str | None, created: float, complete: bool, status: str, reason: str
) -> None:
    verdict, _ = grant_unused(last_used, created, 2 * HOUR, complete=complete, now=NOW)
    assert (verdict["type"], verdict["status"], verdict["reason"]) == ("Unused", status, reason)


def test_unused_says_when_to_look_again() -> None:
    _, wake = grant_unused(None, NOW - 60, 2 * HOUR, complete=True, now=NOW)
    assert wake == NOW - 60 + 2 * HOUR
