"""`nhigate proxy`: run the identity-aware proxy (standalone or cluster mode)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import Any

from nhigate.cli.logs import setup_logging
from nhigate.proxy.settings import (
    MIB,
    ProxySettings,
    parse_listen,
    parse_upstream,
)


def _size(value: str) -> int:
    units = {"k": 1024, "m": MIB, "g": 1024 * MIB}
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _default(name: str) -> Any:
    """`ProxySettings`' own default for a field, so the flag and the dataclass agree."""
    return ProxySettings.__dataclass_fields__[name].default


def add_parser(subparsers: Any) -> None:
    """Register `nhigate proxy`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "proxy",
        help="run the identity-aware proxy",
        description="Authenticate, authorise, audit and forward every request to one upstream.",
    )
    p.add_argument("--upstream", required=True, help="backend URL, http(s)://host:port")
    p.add_argument("--listen", default="0.0.0.0:8443", help="proxied port HOST:PORT")
    p.add_argument("--admin-listen", default="0.0.0.0:9090", help="admin port HOST:PORT")
    src = p.add_argument_group("policy source (one of)")
    src.add_argument("--resources", type=Path, help="standalone: directory of resource YAML")
    src.add_argument("--service", help="standalone: ProtectedService name (if DIR holds several)")
    src.add_argument("--kube", action="store_true", help="cluster: watch the policy ConfigMap")
    src.add_argument("--kubeconfig", help="cluster: kubeconfig (default: in-cluster or ~/.kube)")
    src.add_argument("--namespace", help="cluster: namespace of the ConfigMap and Lease")
    src.add_argument("--policy-configmap", help="cluster: ConfigMap holding policy.json.gz")
    src.add_argument("--replica-name", help="cluster: this replica's name (pod name) for its Lease")
    p.add_argument("--assertion-key", type=Path, help="EC P-256 PEM key for identity assertions")
    p.add_argument("--tls-cert", type=Path, help="server certificate for the proxied port")
    p.add_argument("--tls-key", type=Path, help="server key for the proxied port")
    p.add_argument("--client-ca", type=Path, help="CA for optional client certificates (SPIFFE)")
    p.add_argument("--audit-log", default="-", help="audit JSON lines: - (stdout) or a file path")
    p.add_argument("--max-body-size", type=_size, default=10 * MIB, help="e.g. 10MiB (-> 413)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds (-> 502/504)")
    p.add_argument("--upstream-timeout", type=float, default=30.0, help="seconds idle (-> 504)")
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="peer whose X-Forwarded-* headers are kept (repeatable)",
    )
    p.add_argument(
        "--request-head-timeout",
        type=float,
        default=_default("request_head_timeout"),
        help="seconds for a whole request head, however it trickles (-> 408 / close)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=_default("idle_timeout"),
        help="seconds a keep-alive connection may sit idle",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=_default("max_connections"),
        help="open client connections per process; more get 503",
    )
    p.add_argument(
        "--upstream-protocol",
        choices=("http1", "http2"),
        default=_default("upstream_protocol"),
        help="what the backend speaks; http2 makes the proxied port HTTP/2 only (gRPC)",
    )
    p.add_argument(
        "--http1-server",
        choices=("aiohttp", "native"),
        default=_default("http1_server"),
        help="HTTP/1.1 front end of the proxied port; native has no WebSocket or MCP (501)",
    )
    p.add_argument("--drain-timeout", type=float, default=15.0, help="seconds to drain on stop")
    p.add_argument("--shutdown-delay", type=float, default=0.0, help="seconds unready before close")
    p.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    """Build `ProxySettings` from parsed arguments (raises ValueError on bad combinations)."""
    host, port = parse_listen(args.listen)
    admin_host, admin_port = parse_listen(args.admin_listen)
    return ProxySettings(
        upstream=parse_upstream(args.upstream),
        listen_host=host,
        listen_port=port,
        admin_host=admin_host,
        admin_port=admin_port,
        resources_dir=args.resources,
        service=args.service,
        kube=args.kube,
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        policy_configmap=args.policy_configmap,
        replica_name=args.replica_name,
        assertion_key=args.assertion_key,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.client_ca,
        audit_log=args.audit_log,
        max_body_bytes=args.max_body_size,
        connect_timeout=args.connect_timeout,
        upstream_timeout=args.upstream_timeout,
        trusted_proxies=tuple(ipaddress.ip_network(c, strict=False) for c in args.trusted_proxy),
        request_head_timeout=args.request_head_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        drain_timeout=args.drain_timeout,
        shutdown_delay=args.shutdown_delay,
        workers=args.workers,
        upstream_protocol=args.upstream_protocol,
        http1_server=args.http1_server,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of `nhigate proxy`."""
    setup_logging(args.log_level)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        logging.getLogger("nhigate.proxy").error("%s", exc)
        return 2
    from nhigate.proxy.server import run as run_server

    return run_server(settings)
