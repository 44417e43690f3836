"""Prometheus metrics of one proxy process, in its own registry (never the global one)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
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


class LatencyHistogram:
    """A Prometheus histogram for the request path: one list increment per observation.

    `prometheus_client.Histogram` takes a lock and walks every bucket in Python on each
    `observe()`; here a binary search finds the one bucket to bump and the cumulative
    counts are computed at scrape time. Observations and scrapes both happen on the
    event-loop thread, so no lock is needed.
    """

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration (`le` buckets: a value on a bound counts in that bucket)."""
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """`(le, cumulative count)` pairs including `+Inf`, and the sum."""
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return buckets, self._sum


class _RequestCollector(Collector):
    """Exposes the per-request counters and histograms kept by `ProxyMetrics`."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "nhigate_proxy_requests",
            "Requests by decision, reason and grant.",
            labels=["decision", "reason", "grant"],
        )
        for key, value in sorted(m._request_counts.items()):
            requests.add_metric(list(key), float(value))
        yield requests
        duration = HistogramMetricFamily(
            "nhigate_proxy_request_duration_seconds",
            "Time from request arrival to response head (or deny), by decision.",
            labels=["decision"],
        )
        for decision, hist in sorted(m._durations.items()):
            buckets, total = hist.cumulative()
            duration.add_metric([decision], buckets, total)
        yield duration
        buckets, total = m.upstream_duration.cumulative()
        yield HistogramMetricFamily(
            "nhigate_proxy_upstream_duration_seconds",
            "Time from sending upstream to the response head.",
            buckets=buckets,
            sum_value=total,
        )


class ProxyMetrics:
    """All proxy metrics; the per-request ones are plain counters exported at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._request_counts: dict[tuple[str, str, str], int] = {}
        self._durations: dict[str, LatencyHistogram] = {}
        self.upstream_duration = LatencyHistogram(_LATENCY_BUCKETS)
        r.register(_RequestCollector(self))
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
        self.connections_refused = Counter(
            "nhigate_proxy_connections_refused",
            "Client connections refused (503) because the replica held --max-connections.",
            registry=r,
        )
        self.client_timeouts = Counter(
            "nhigate_proxy_client_timeouts",
            "Client connections closed by a timeout: head (request head too slow) or idle.",
            ["kind"],
            registry=r,
        )
        self.connections_open = Gauge(
            "nhigate_proxy_connections_open",
            "Client connections open on the proxied port.",
            registry=r,
        )
        self.ready = Gauge("nhigate_proxy_ready", "1 when serving with a valid policy.", registry=r)
        self.websocket_open = Gauge(
            "nhigate_proxy_websocket_connections", "WebSocket connections open now.", registry=r
        )
        self.websocket_closed = Counter(
            "nhigate_proxy_websocket_closed",
            "WebSocket connections ended, by who ended them (client, backend, proxy) and why.",
            ["closed_by", "reason"],
            registry=r,
        )
        self.websocket_bytes = Counter(
            "nhigate_proxy_websocket_bytes",
            "Bytes relayed over WebSocket connections that ended, by direction.",
            ["direction"],
            registry=r,
        )
        self._version: str | None = None

    def watch_jwks_refreshes(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Export the authenticator's JWKS refresh counters (`(issuer, result) -> count`)."""
        self.registry.register(_RefreshCollector(read))

    def observe_request(
        self, decision: str, reason: str, grant: str | None, seconds: float
    ) -> None:
        """Count one decision and its latency (call on the event-loop thread)."""
        key = (decision, reason, grant or "")
        counts = self._request_counts
        try:
            counts[key] += 1
        except KeyError:
            counts[key] = 1
        hist = self._durations.get(decision)
        if hist is None:
            hist = self._durations[decision] = LatencyHistogram(_LATENCY_BUCKETS)
        # LatencyHistogram.observe, inlined: this runs once per request.
        hist._counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        hist._sum += seconds

    def request_count(self, decision: str, reason: str, grant: str | None = None) -> int:
        """How many requests ended with this decision, reason and grant."""
        return self._request_counts.get((decision, reason, grant or ""), 0)

    def set_policy_version(self, version: str) -> None:
        """Record the version now served."""
        if self._version is not None:
            self.policy_version.remove(self._version)
        self.policy_version.labels(version).set(1)
        self._version = version
