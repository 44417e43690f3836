"""Prometheus metrics of one proxy process, in its own registry (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _RefreshCollector(Collector):
    """Exposes the authenticator's JWKS refresh counters at scrape time."""

    def __init__(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "nhigate_proxy_jwks_refresh",
            "JWKS fetches by issuer and result, as counted by the authenticator.",
            labels=["issuer", "result"],
        )
        for (issuer, result), value in sorted(self._read().items()):
            family.add_metric([issuer, result], float(value))
        yield family


class ProxyMetrics:
    """All proxy metrics, with labelled children cached for the per-request path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "nhigate_proxy_requests",
            "Requests by decision, reason and grant.",
            ["decision", "reason", "grant"],
            registry=r,
        )
        self.request_duration = Histogram(
            "nhigate_proxy_request_duration_seconds",
            "Time from request arrival to response head (or deny), by decision.",
            ["decision"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "nhigate_proxy_upstream_duration_seconds",
            "Time from sending upstream to the response head.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_version = Gauge(
            "nhigate_proxy_policy_version_info",
            "The policy version this replica serves (value 1).",
            ["version"],
            registry=r,
        )
        self.policy_reloads = Counter(
            "nhigate_proxy_policy_reloads",
            "Policy loads by result (loaded, unchanged, error).",
            ["result"],
            registry=r,
        )
        self.rate_limited = Counter(
            "nhigate_proxy_rate_limited", "Requests denied by rate limiting.", registry=r
        )
        self.audit_dropped = Gauge(
            "nhigate_proxy_audit_dropped_records",
            "Audit records dropped because the sink fell too far behind.",
            registry=r,
        )
        self.ready = Gauge("nhigate_proxy_ready", "1 when serving with a valid policy.", registry=r)
        self._request_children: dict[tuple[str, str, str], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._version: str | None = None

    def watch_jwks_refreshes(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Export the authenticator's JWKS refresh counters (`(issuer, result) -> count`)."""
        self.registry.register(_RefreshCollector(read))

    def observe_request(
        self, decision: str, reason: str, grant: str | None, seconds: float
    ) -> None:
        """Count one decision and its latency."""
        key = (decision, reason, grant or "")
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(*key)
            self._request_children[key] = child
        child.inc()
        hist = self._duration_children.get(decision)
        if hist is None:
            hist = self.request_duration.labels(decision)
            self._duration_children[decision] = hist
        hist.observe(seconds)

    def set_policy_version(self, version: str) -> None:
        """Record the version now served."""
        if self._version is not None:
            self.policy_version.remove(self._version)
        self.policy_version.labels(version).set(1)
        self._version = version
