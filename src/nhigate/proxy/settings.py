"""The proxy's settings: one frozen dataclass, built by the CLI, passed in, never global."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

MIB = 1024 * 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Upstream:
    """The backend every request is forwarded to."""

    scheme: str
    """`http` or `https`."""
    host: str
    """Host name or IP literal (without brackets)."""
    port: int
    """TCP port."""

    @property
    def authority(self) -> str:
        """`host:port` as sent in the upstream `Host` header."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The upstream as a URL, for the audit log."""
        return f"{self.scheme}://{self.authority}"


def parse_upstream(url: str) -> Upstream:
    """Parse `--upstream`: `http(s)://host[:port]` with no path, query or credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"upstream must be an http:// or https:// URL, got {url!r}")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError(f"upstream needs a host and no credentials: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"upstream must not carry a path or query: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(parts.scheme, parts.hostname, port)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse `HOST:PORT` (IPv6 as `[::1]:8443`)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, number


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Everything one proxy process needs; see `nhigate proxy --help`."""

    upstream: Upstream
    """The backend all authorised requests are forwarded to."""
    listen_host: str = "127.0.0.1"
    """Address of the proxied (data-plane) port."""
    listen_port: int = 8443
    """Port of the proxied (data-plane) port; 0 picks a free one."""
    admin_host: str = "127.0.0.1"
    """Address of the admin port (health, readiness, metrics, JWKS)."""
    admin_port: int = 9090
    """Port of the admin port; 0 picks a free one."""
    resources_dir: Path | None = None
    """Standalone mode: directory of resource YAML, polled for changes."""
    service: str | None = None
    """Standalone mode: which ProtectedService in `resources_dir` to enforce (needed if several)."""
    reload_interval: float = 1.0
    """Standalone mode: seconds between mtime polls of `resources_dir`."""
    kube: bool = False
    """Cluster mode: watch the policy ConfigMap through the Kubernetes API."""
    kubeconfig: str | None = None
    """Cluster mode: kubeconfig file; None = in-cluster config or the default kubeconfig."""
    namespace: str | None = None
    """Cluster mode: namespace of the policy ConfigMap and the replica Lease."""
    policy_configmap: str | None = None
    """Cluster mode: name of the policy ConfigMap (binaryData key `policy.json.gz`)."""
    replica_name: str | None = None
    """Cluster mode: this replica's name (the pod name), used for its Lease."""
    lease_interval: float = 5.0
    """Cluster mode: seconds between Lease renewals (also renewed on every policy swap)."""
    assertion_key: Path | None = None
    """PEM EC private key for identity assertions; None = an ephemeral key per process."""
    tls_cert: Path | None = None
    """Server certificate (PEM) for the proxied port; None = plain HTTP."""
    tls_key: Path | None = None
    """Server private key (PEM) matching `tls_cert`."""
    client_ca: Path | None = None
    """CA bundle for optional client certificates (mTLS, SPIFFE IDs from URI SANs)."""
    audit_log: str = "-"
    """Audit sink: `-` for stdout or a file path (appended)."""
    max_body_bytes: int = 10 * MIB
    """Largest request body forwarded; larger bodies get 413."""
    connect_timeout: float = 5.0
    """Seconds to open a new upstream connection before answering 502."""
    upstream_timeout: float = 30.0
    """Seconds of upstream silence (waiting for headers or the next body chunk) before 504."""
    upstream_pool_size: int = 256
    """Idle keep-alive upstream connections kept for reuse."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose `X-Forwarded-*` headers are kept and extended instead of replaced."""
    token_cache_size: int = 65536
    """Verified-token cache entries (bounded)."""
    request_head_timeout: float = 60.0
    """Seconds a client has to send a whole request head, however slowly the bytes trickle in:
    from accepting the connection, and for a later request on a kept-alive connection from its
    first byte. A partial head then gets 408, a connection that sent nothing is closed."""
    idle_timeout: float = 75.0
    """Seconds a kept-alive connection may sit idle between requests before it is closed."""
    max_connections: int = 4096
    """Open client connections on the proxied port, per process; more are refused (503)."""
    drain_timeout: float = 15.0
    """Seconds in-flight requests get to finish on shutdown."""
    shutdown_delay: float = 0.0
    """Seconds between failing readiness and closing the listener (lets endpoints update)."""
    workers: int = 1
    """Worker processes sharing the proxied port with SO_REUSEPORT."""
    extra_owned_headers: frozenset[str] = field(default_factory=frozenset)
    """Additional lower-case header names never accepted from callers."""
    upstream_protocol: Literal["http1", "http2"] = "http1"
    """What the backend speaks, and so what the proxied port speaks: `http2` serves HTTP/2
    only (TLS ALPN `h2`, plaintext h2c with prior knowledge; an HTTP/1.1 request gets 505,
    so `Upgrade: h2c` never switches) and forwards over HTTP/2, which gRPC needs."""
    http1_server: Literal["aiohttp", "native"] = "aiohttp"
    """What serves HTTP/1.1 on the proxied port: aiohttp's web layer, or `native`
    (`http1.py`: llhttp under our own protocol; no WebSocket relay or MCP endpoints)."""

    def __post_init__(self) -> None:
        if self.kube and (not self.namespace or not self.policy_configmap):
            raise ValueError("cluster mode needs --namespace and --policy-configmap")
        if self.kube and self.resources_dir is not None:
            raise ValueError("choose one policy source: --kube or --resources")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("--client-ca needs --tls-cert/--tls-key")
        if self.max_body_bytes < 0 or self.workers < 1:
            raise ValueError("max body size must be >= 0 and workers >= 1")
        if not (self.request_head_timeout > 0 and self.idle_timeout > 0):
            raise ValueError("--request-head-timeout and --idle-timeout must be > 0 seconds")
        if self.max_connections < 1:
            raise ValueError("--max-connections must be >= 1")
        if self.upstream_protocol not in ("http1", "http2"):
            raise ValueError("--upstream-protocol must be http1 or http2")
        if self.http1_server not in ("aiohttp", "native"):
            raise ValueError("--http1-server must be aiohttp or native")
        if self.http1_server == "native" and self.upstream_protocol == "http2":
            raise ValueError(
                "--http1-server native serves HTTP/1.1 only; --upstream-protocol http2 makes "
                "the port HTTP/2 only (keep the default --http1-server aiohttp)"
            )
