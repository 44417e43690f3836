"""Soak: sustained bounded load on a standalone proxy while a grant is created and deleted every
second in its resources directory.

Short form by default (20 s, in CI); set NHIGATE_SOAK_SECONDS for a long run. Asserts: no 5xx,
RSS growth under RSS_GROWTH_BOUND_MIB, one audit record per request, and no allow for the
churned grant under a policy version that did not contain it (each audit record names the
policy version it was decided under; every loaded version is recorded as it is swapped in).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path

from harness import (
    SUBJECT,
    ProxyThread,
    make_signing_key,
    raw_exchange,
    resource_documents,
    write_resources,
)

from nhigate.policy import Policy
from nhigate.proxy.policy_source import StandaloneSource

SOAK_SECONDS = float(os.environ.get("NHIGATE_SOAK_SECONDS", "20"))
RSS_GROWTH_BOUND_MIB = 40.0
"""Stated bound on resident-memory growth of the process hosting the proxy during the soak."""
CHURNER = "churn-agent"
KEY = make_signing_key("ES256", kid="soak")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _documents(with_churn: bool) -> dict[str, list[dict[str, object]]]:
    grants = {"read": (SUBJECT, ["GET"], ["/v1/items/**"])}
    if with_churn:
        grants["churn"] = (CHURNER, ["GET"], ["/v1/churn/**"])
    return resource_documents(KEY, grants)


def test_soak_with_grant_churn(tmp_path: Path) -> None:
    directory = tmp_path / "resources"
    write_resources(directory, _documents(with_churn=False))
    versions: dict[str, bool] = {}  # policy version -> holds the churned grant

    def remember(policy: Policy) -> None:
        versions[policy.version] = any(g.name.endswith("/churn") for g in policy.document.grants)

    with ProxyThread(KEY, None) as proxy:  # type: ignore[arg-type]
        proxy.call_soon(lambda: proxy.holder.subscribe(remember))
        source = StandaloneSource(directory, None, proxy.holder, interval=0.1, clock=time.time)
        assert proxy.call(source.load_once())
        poller = proxy.call_soon(lambda: asyncio.ensure_future(source.run()))

        tokens = {SUBJECT: proxy.token(lifetime=3000), CHURNER: proxy.token(CHURNER, lifetime=3000)}
        targets = [
            (SUBJECT, "/v1/items/1", {200}),
            (SUBJECT, "/admin", {403}),
            (CHURNER, "/v1/churn/1", {200, 403}),
            (CHURNER, "/v1/items/1", {403}),
        ]
        statuses: Counter[tuple[str, str, int]] = Counter()
        unexpected: list[tuple[str, str, int]] = []
        sent = 0
        stop = threading.Event()
        lock = threading.Lock()

        def load(offset: int) -> None:
            nonlocal sent
            i = offset
            while not stop.is_set():
                subject, path, allowed = targets[i % len(targets)]
                i += 1
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {tokens[subject]}"
                    "\r\nConnection: close\r\n\r\n"
                ).encode()
                responses, _, _ = raw_exchange(proxy.port, request, timeout=5.0)
                status = responses[0].status if responses else 0
                with lock:
                    sent += 1
                    statuses[(subject, path, status)] += 1
                    if status not in allowed:
                        unexpected.append((subject, path, status))
                time.sleep(0.002)  # bounded load: a few hundred requests per second at most

        for _ in range(50):  # warm up allocator, caches and connection pools
            proxy.probe("/v1/items/warm")
        rss_before = _rss_mib()
        workers = [threading.Thread(target=load, args=(n,)) for n in range(2)]
        for worker in workers:
            worker.start()
        churn_on = False
        started = time.monotonic()
        try:
            while time.monotonic() - started < SOAK_SECONDS:
                time.sleep(1.0)
                churn_on = not churn_on
                write_resources(directory, _documents(with_churn=churn_on))
                if not churn_on:
                    (directory / "grant-churn.yaml").unlink(missing_ok=True)
        finally:
            stop.set()
            for worker in workers:
                worker.join(10)
            proxy.call_soon(poller.cancel)
        rss_after = _rss_mib()
        records = proxy.audit_records()

    warmup = 50
    five_xx = sum(n for (_, _, s), n in statuses.items() if s >= 500 or s == 0)
    assert five_xx == 0, statuses
    assert unexpected == [], unexpected[:10]
    assert rss_after - rss_before < RSS_GROWTH_BOUND_MIB, (rss_before, rss_after)
    assert len(records) == sent + warmup, (len(records), sent)
    churn_records = [r for r in records if r["identity"] and r["identity"]["subject"] == CHURNER]
    churn_allows = [
        r for r in churn_records if r["path"] == "/v1/churn/1" and r["decision"] == "allow"
    ]
    churn_denies = [
        r for r in churn_records if r["path"] == "/v1/churn/1" and r["decision"] == "deny"
    ]
    # Every allow was decided under a version holding the grant; every deny under one without.
    assert all(versions[r["policy_version"]] for r in churn_allows)
    assert not any(versions[r["policy_version"]] for r in churn_denies)
    assert churn_allows, "the grant was never loaded during the soak"
    assert churn_denies, "the grant was never removed during the soak"
    assert len(versions) >= 2
    print(
        f"soak {SOAK_SECONDS:g}s: {sent} requests, {len(versions)} policy versions, "
        f"{len(churn_allows)} churn allows, {len(churn_denies)} churn denies, "
        f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    )
