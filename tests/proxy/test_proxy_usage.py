"""Per-replica usage: the real proxy counts allowed requests per grant and rule, within its
documented bounds, and a restarted replica carries its counts on without doubling them."""

from __future__ import annotations

from typing import Any

import pytest

from nhigate.policy import (
    Grant,
    Policy,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    make_document,
)
from nhigate.policy.usage import (
    HOUR,
    MAX_SHAPES,
    RuleUse,
    UsageReport,
    decode_report,
    encode_report,
    rule_key,
)
from nhigate.proxy.policy_source import LeaseReporter, PolicyHolder
from nhigate.proxy.state import STATE
from nhigate.proxy.usage import UsageRecorder

NOW = 1_900_000_000.0


def _policy(*grants: Grant) -> Policy:
    service = ServiceConfig(namespace="ns", name="api", backend_service="b", backend_port=80)
    return compile_policy(make_document(service, (), grants, ()))


def _uses(report: UsageReport, grant: str) -> dict[str, RuleUse]:
    return dict(report.grants.get(grant) or {})


async def test_allowed_requests_are_counted_per_grant_and_rule(proxy: Any) -> None:
    two_rules = Grant(
        name="payments/two",
        subjects=(TokenSubject(issuer="ci", subject="ci-deployer"),),
        rules=(
            Rule(methods=frozenset({"GET"}), paths=("/v1/items/**",)),
            Rule(methods=frozenset({"POST"}), paths=("/v1/orders",)),
        ),
    )
    policy = proxy.set_policy((two_rules,))
    for path in ("/v1/items/1", "/v1/items/2/history", "/v1/items/3"):
        async with proxy.session.get(f"{proxy.url}{path}", headers=proxy.auth()) as resp:
            assert resp.status == 200
    async with proxy.session.get(f"{proxy.url}/v1/orders", headers=proxy.auth()) as resp:
        assert resp.status == 403  # denied: never counted
    report = proxy.app[STATE].usage.report(proxy.clock())
    uses = _uses(report, "payments/two")
    first = rule_key(0, two_rules.rules[0])
    assert set(uses) == {first}  # the POST rule allowed nothing
    assert sum(uses[first].hours.values()) == 3
    assert uses[first].shapes == ("GET /v1/items/*", "GET /v1/items/*/history")
    assert uses[first].last_used == int(proxy.clock())
    assert report.complete
    assert policy.grants[0].name == "payments/two"


def test_the_table_is_bounded_and_says_when_it_lost_something() -> None:
    grants = tuple(
        Grant(
            name=f"ns/g{i}",
            subjects=(TokenSubject(issuer="ci", subject="s"),),
            rules=(Rule(methods=frozenset({"GET"}), paths=("/**",)),),
        )
        for i in range(5)
    )
    policy = _policy(*grants)
    recorder = UsageRecorder(max_rules=3)
    for grant in grants:
        recorder.record(policy, grant.name, "GET", "/x", NOW)
    assert len(recorder) == 3
    assert recorder.untracked == 2
    report = recorder.report(NOW)
    assert not report.complete  # so the controller never calls g3/g4 unused from it
    # A day later the old entries hold no count in the window: they make room again.
    later = NOW + 25 * HOUR
    recorder.record(policy, "ns/g4", "GET", "/x", later)
    assert "ns/g4" in recorder.report(later).grants
    assert len(recorder) == 3
    # Completeness comes back once the overflow has left the window.
    assert recorder.report(NOW + 49 * HOUR).complete


def test_shapes_per_rule_are_bounded() -> None:
    grant = Grant(
        name="ns/g",
        subjects=(TokenSubject(issuer="ci", subject="s"),),
        rules=(Rule(methods=frozenset({"GET"}), paths=("/**",)),),
    )
    policy = _policy(grant)
    recorder = UsageRecorder()
    for i in range(50):
        recorder.record(policy, "ns/g", "GET", f"/area{i}/items/{i}", NOW)
    (use,) = recorder.report(NOW).grants["ns/g"].values()
    assert len(use.shapes) == MAX_SHAPES
    assert use.more_shapes
    assert sum(use.hours.values()) == 50


class _LeaseApi:
    """A Lease store: get and apply, as the proxy's RBAC allows."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None

    async def get(self, ref: Any, name: str, namespace: str | None = None) -> Any:
        return self.lease

    async def apply(self, manifest: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.lease = manifest
        return manifest


async def test_a_restarted_replica_carries_its_counts_on_without_doubling(kit: Any) -> None:
    grant = Grant(
        name="ns/g",
        subjects=(TokenSubject(issuer="ci", subject="s"),),
        rules=(Rule(methods=frozenset({"GET"}), paths=("/**",)),),
    )
    policy = _policy(grant)
    api = _LeaseApi()

    async def run_process(requests: int, at: float) -> UsageReport:
        holder = PolicyHolder()
        holder.swap(policy)
        recorder = UsageRecorder()
        reporter = LeaseReporter(api, "ns", "r0", holder, clock=lambda: at, usage=recorder)
        for _ in range(requests):
            recorder.record(policy, "ns/g", "GET", "/a", at)
        await reporter.report_once()
        await reporter.report_once()  # reporting twice changes nothing
        assert api.lease is not None
        return decode_report(api.lease["metadata"]["annotations"]["nhigate.io/usage"])

    first = await run_process(3, NOW)
    second = await run_process(2, NOW + 60)  # a new process on the same Lease
    assert first.instance != second.instance
    (use,) = second.grants["ns/g"].values()
    assert sum(use.hours.values()) == 5
    assert use.last_used == int(NOW + 60)


def test_workers_sharing_a_lease_report_incomplete_and_adopt_nothing() -> None:
    shared = UsageRecorder(complete=False)
    sibling = UsageReport("other", {"ns/g": {"0:x": RuleUse(int(NOW), {int(NOW) // HOUR: 7})}})
    shared.adopt(sibling, NOW)
    report = shared.report(NOW)
    assert report.grants == {}
    assert not report.complete
    assert decode_report(encode_report(report)) == report


async def test_an_unchanged_table_is_not_encoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from nhigate.proxy import policy_source

    encoded: list[UsageReport] = []

    def counting(report: UsageReport, max_bytes: int = 64 * 1024) -> str:
        encoded.append(report)
        return encode_report(report, max_bytes)

    monkeypatch.setattr(policy_source, "encode_report", counting)
    grant = Grant(
        name="ns/g",
        subjects=(TokenSubject(issuer="ci", subject="s"),),
        rules=(Rule(methods=frozenset({"GET"}), paths=("/**",)),),
    )
    policy = _policy(grant)
    holder = PolicyHolder()
    holder.swap(policy)
    recorder = UsageRecorder()
    reporter = LeaseReporter(_LeaseApi(), "ns", "r0", holder, clock=lambda: NOW, usage=recorder)
    await reporter.report_once()
    await reporter.report_once()
    assert len(encoded) == 1
    recorder.record(policy, "ns/g", "GET", "/a", NOW)
    await reporter.report_once()
    assert len(encoded) == 2
