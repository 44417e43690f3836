"""The lock-free request metrics expose the same Prometheus families as prometheus_client's."""

from __future__ import annotations

from prometheus_client import generate_latest

from nhigate.proxy.metrics import LatencyHistogram, ProxyMetrics


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = LatencyHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.01, 0.5):
        hist.observe(seconds)
    buckets, total = hist.cumulative()
    # `le` is inclusive: 0.001 counts in the 0.001 bucket, 0.01 in the 0.01 bucket.
    assert buckets == [("0.001", 2.0), ("0.01", 4.0), ("0.1", 4.0), ("+Inf", 5.0)]
    assert total == 0.0005 + 0.001 + 0.002 + 0.01 + 0.5


def test_exposition_has_requests_and_latency_families() -> None:
    metrics = ProxyMetrics()
    metrics.observe_request("allow", "allowed", "payments/read", 0.0007)
    metrics.observe_request("allow", "allowed", "payments/read", 0.003)
    metrics.observe_request("deny", "no_matching_grant", None, 0.0002)
    metrics.upstream_duration.observe(0.0004)
    text = generate_latest(metrics.registry).decode()
    assert (
        'nhigate_proxy_requests_total{decision="allow",grant="payments/read",reason="allowed"} 2.0'
        in text
    )
    assert (
        'nhigate_proxy_requests_total{decision="deny",grant="",reason="no_matching_grant"} 1.0'
        in text
    )
    assert 'nhigate_proxy_request_duration_seconds_bucket{decision="allow",le="0.001"} 1.0' in text
    assert 'nhigate_proxy_request_duration_seconds_count{decision="allow"} 2.0' in text
    assert 'nhigate_proxy_upstream_duration_seconds_bucket{le="0.0005"} 1.0' in text
    assert "# TYPE nhigate_proxy_request_duration_seconds histogram" in text
    assert metrics.request_count("allow", "allowed", "payments/read") == 2
