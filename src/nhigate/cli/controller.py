"""`nhigate controller`: run the operator (kopf embedded in this process)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_PROXY_IMAGE = "ghcr.io/nhigate/nhigate:0.1.0"


def add_parser(subparsers: Any) -> None:
    """Register `nhigate controller`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "controller",
        help="run the controller (reconciles nhigate custom resources)",
        description="Reconcile ProtectedServices, RouteGrants, IdentityIssuers and Revocations "
        "into proxies and isolation, and report enforcement in status.",
    )
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config)"
    )
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        metavar="NAMESPACE",
        help="serve only this namespace (repeatable; glob patterns allowed); default: all",
    )
    p.add_argument(
        "--proxy-image",
        default=DEFAULT_PROXY_IMAGE,
        help=f"image for proxy Deployments (default {DEFAULT_PROXY_IMAGE})",
    )
    p.add_argument(
        "--proxy-image-pull-policy",
        default="IfNotPresent",
        choices=["Always", "IfNotPresent", "Never"],
        help="imagePullPolicy of the proxy containers (default IfNotPresent)",
    )
    p.add_argument("--liveness", metavar="HOST:PORT", help="serve /healthz on HOST:PORT")
    p.add_argument(
        "--peering",
        action="store_true",
        help="coordinate several controller replicas through kopf peering (KopfPeering CRDs)",
    )
    p.add_argument("--peering-name", default="nhigate", help="peering object name")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of the controller's own log lines",
    )
    p.add_argument(
        "--drift-interval",
        type=float,
        default=60.0,
        help="seconds between full re-applies of each ProtectedService",
    )
    p.add_argument(
        "--unused-after",
        type=float,
        default=7 * 24 * 3600.0,
        metavar="SECONDS",
        help="a grant with no allowed request for this long is Unused (default 604800: 7 days;"
        " a ProtectedService's grantPolicy.unusedAfter overrides it)",
    )
    p.add_argument(
        "--usage-write-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="least seconds between two writes of a grant's status.usage (default 60)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start the controller with the parsed arguments; blocks until stopped."""
    from nhigate.cli.logs import setup_logging
    from nhigate.controller.run import liveness_url, main
    from nhigate.controller.settings import ControllerSettings

    liveness_url(args.liveness)  # fail fast on a malformed HOST:PORT
    settings = ControllerSettings(
        proxy_image=args.proxy_image,
        proxy_image_pull_policy=args.proxy_image_pull_policy,
        kubeconfig=args.kubeconfig,
        namespaces=tuple(args.namespaces),
        peering=args.peering,
        peering_name=args.peering_name,
        liveness=args.liveness,
        drift_interval=args.drift_interval,
        unused_after=args.unused_after,
        usage_write_interval=args.usage_write_interval,
        log_level=args.log_level,
    )
    setup_logging(settings.log_level)
    return main(settings)
