"""Usage stays within its documented bounds however many distinct requests and callers come."""

from __future__ import annotations

from nhigate.policy import Grant, Rule, TokenSubject
from nhigate.review.records import AuditRecord
from nhigate.review.usage import (
    MAX_BUCKETS,
    MAX_CACHED_REQUESTS,
    MAX_DENIED_IDENTITIES,
    MAX_IDENTITIES,
    MAX_TRIED,
    MAX_UNKNOWN_GRANTS,
    TimeSeries,
    UsageBuilder,
)

GRANT = Grant(
    name="ns/g",
    subjects=(TokenSubject("idp", "caller-0"),),
    rules=(Rule(frozenset({"GET"}), ("/v1/**",)), Rule(frozenset({"*"}), ("/admin/*",))),
)


def _record(n: int, decision: str, path: str, grant: str | None, subject: str) -> AuditRecord:
    reason = "allowed" if decision == "allow" else "no_matching_grant"
    return AuditRecord(n * 7.0, decision, reason, grant, "GET", path, "idp", subject, "jwt")


def test_distinct_requests_callers_and_grants_stay_bounded() -> None:
    builder = UsageBuilder([GRANT])
    count = 3 * MAX_CACHED_REQUESTS
    for n in range(count):
        word = "".join(chr(ord("a") + int(d)) for d in str(n))
        builder.add(_record(n, "allow", f"/v1/{word}/{n}", "ns/g", f"caller-{n}"))
        builder.add(_record(n, "allow", "/v1/x", f"ns/other-{n}", "caller-0"))
        prober = f"stranger-{n}" if n % 2 else "prober"
        builder.add(_record(n, "deny", f"/secret/{word}", None, prober))
    usage = builder.usage
    grant = usage.grants["ns/g"]
    assert grant.requests == count
    assert usage.records == 3 * count
    assert len(builder._cache) <= MAX_CACHED_REQUESTS
    assert len(grant.identities) == MAX_IDENTITIES
    assert not grant.identities_complete  # so no subject is called unused on partial data
    assert len(usage.unknown_grants) == MAX_UNKNOWN_GRANTS
    assert len(usage.denied_callers) == MAX_DENIED_IDENTITIES
    assert usage.denied_callers_dropped > 0
    assert all(len(c.tried) <= MAX_TRIED for c in usage.denied_callers.values())
    assert max(c.other_tried for c in usage.denied_callers.values()) > 0
    shapes = grant.rules[0].shapes[(0, "GET")]
    assert shapes.patterns() == ["/v1/*/*"]  # folded, not one pattern per path
    assert len(grant.series.counts) <= MAX_BUCKETS


def test_the_time_series_widens_its_buckets_and_keeps_every_request() -> None:
    series = TimeSeries()
    for n in range(10_000):
        series.add(n * 60.0 * 7)  # one request every 7 minutes for ~49 days
    assert sum(c for _, c in series.points()) == 10_000
    assert len(series.counts) <= MAX_BUCKETS
    assert series.width > 60.0


def test_paths_differing_only_in_ids_share_one_attribution() -> None:
    builder = UsageBuilder([GRANT])
    for n in range(100):
        builder.add(_record(n, "allow", f"/v1/orders/{n}", "ns/g", "caller-0"))
    assert ("ns/g", "GET", "/v1/orders/*") in builder._cache
    assert len(builder._cache) == 1  # one entry for the shape, not one per path
    assert builder.usage.grants["ns/g"].rules[0].requests == 100


def test_a_grant_naming_an_id_is_attributed_path_by_path() -> None:
    # /v1/7 and /v1/42 have one shape, but only /v1/42 is rule 1's: no shape cache here.
    grant = Grant(
        name="ns/ids",
        subjects=(TokenSubject("idp", "caller-0"),),
        rules=(Rule(frozenset({"GET"}), ("/v1/42",)), Rule(frozenset({"GET"}), ("/v1/*",))),
    )
    builder = UsageBuilder([grant])
    builder.add(_record(1, "allow", "/v1/7", "ns/ids", "caller-0"))
    builder.add(_record(2, "allow", "/v1/42", "ns/ids", "caller-0"))
    rules = builder.usage.grants["ns/ids"].rules
    assert [r.requests for r in rules] == [1, 1]
