"""`nhigate access-review`: least privilege from evidence (docs/access-review.md).

Reads audit JSON lines (files or stdin, gzip accepted) and the resources (YAML files or
the cluster), and reports per grant what was granted and not used, what is wider than
the evidence, what lives too long and who cannot authenticate, with a tightened grant
proposed. The logic is `nhigate.review`; this module only reads inputs and writes outputs.
Exit codes: 0 nothing found, 1 findings, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from nhigate.api.models import (
    IdentityIssuer,
    ProtectedService,
    Revocation,
    RouteGrant,
)
from nhigate.api.resources import ResourceError, ResourceSet, load_resources, parse_resource
from nhigate.cli.explain import InputError, parse_at
from nhigate.review.findings import DAY, DEFAULT_MAX_WINDOW, DEFAULT_MIN_DENIALS, ReviewSettings
from nhigate.review.plots import PlotsUnavailable, pyplot, render_plots
from nhigate.review.records import ReadStats, read_records
from nhigate.review.render import render_json, render_table, render_yaml
from nhigate.review.report import review

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2


def add_parser(subparsers: Any) -> None:
    """Register `access-review` on the `nhigate` sub-command parser."""
    parser = subparsers.add_parser(
        "access-review",
        help="compare what grants allow with what the audit shows was used",
        description=(
            "Review RouteGrants against the proxy's audit log: unused grants, rules, methods "
            "and subjects; paths wider than the requests seen; grants without expiry or with "
            "a long window; callers denied repeatedly; subjects that cannot authenticate. "
            "Proposes tightened grants (--output yaml, for kubectl apply). Exit 0 when "
            "nothing is found, 1 with findings, 2 on bad input."
        ),
    )
    parser.add_argument(
        "audit",
        nargs="*",
        default=["-"],
        metavar="AUDIT",
        help="audit JSON-lines files, gzip or not ('-' or none: stdin)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--resources",
        "-r",
        action="append",
        type=Path,
        metavar="PATH",
        help="a YAML file or directory of nhigate resources (repeat for several)",
    )
    source.add_argument(
        "--cluster",
        action="store_true",
        help="read the resources (with their status) from the cluster",
    )
    parser.add_argument("--kubeconfig", metavar="FILE", help="with --cluster (default: usual)")
    parser.add_argument(
        "--namespace", "-n", metavar="NS", help="with --cluster: only this namespace"
    )
    parser.add_argument(
        "--service", metavar="NS/NAME", help="review only the grants of this ProtectedService"
    )
    parser.add_argument(
        "--output", "-o", choices=("table", "json", "yaml"), default="table",
        help="table (people), json (tools) or yaml (the proposed grants, for kubectl apply)",
    )  # fmt: skip
    parser.add_argument(
        "--plots", type=Path, metavar="DIR", help="also write one PNG per service (matplotlib)"
    )
    parser.add_argument("--at", metavar="RFC3339", help="judge expiry at this time (default: now)")
    parser.add_argument(
        "--max-window-days",
        type=int,
        default=int(DEFAULT_MAX_WINDOW // DAY),
        metavar="DAYS",
        help="grants valid for longer are reported (default: %(default)s)",
    )
    parser.add_argument(
        "--min-denials",
        type=int,
        default=DEFAULT_MIN_DENIALS,
        metavar="N",
        help="callers denied at least N times are reported (default: %(default)s)",
    )
    parser.set_defaults(func=run_access_review)


def resource_set(documents: list[Any], where: str) -> ResourceSet:
    """The nhigate resources among decoded documents (as `kubectl get -o json` items)."""
    parsed = [parse_resource(d, f"{where} item {i + 1}") for i, d in enumerate(documents)]
    return ResourceSet(
        issuers=tuple(r for r in parsed if isinstance(r, IdentityIssuer)),
        services=tuple(r for r in parsed if isinstance(r, ProtectedService)),
        grants=tuple(r for r in parsed if isinstance(r, RouteGrant)),
        revocations=tuple(r for r in parsed if isinstance(r, Revocation)),
    )


async def _cluster_documents(kubeconfig: str | None, namespace: str | None) -> list[Any]:
    from kubernetes_asyncio.config import ConfigException

    from nhigate.k8s.client import KubeClient, KubeError
    from nhigate.k8s.resources import IDENTITYISSUERS, PROTECTEDSERVICES, ROUTEGRANTS

    documents: list[Any] = []
    try:
        async with await KubeClient.connect(kubeconfig) as client:
            for ref in (IDENTITYISSUERS, PROTECTEDSERVICES, ROUTEGRANTS):
                items, _version = await client.list(ref, namespace)
                documents.extend(items)
    except KubeError as exc:
        raise InputError(f"--cluster: {exc}") from None
    except (ConfigException, OSError, ValueError) as exc:  # no kubeconfig, no API server
        raise InputError(f"--cluster: cannot read the resources: {exc}") from None
    return documents


def _resources(args: argparse.Namespace) -> ResourceSet:
    if args.cluster:
        documents = asyncio.run(_cluster_documents(args.kubeconfig, args.namespace))
        return resource_set(documents, "cluster")
    if args.kubeconfig is not None:
        raise InputError("--kubeconfig needs --cluster")
    return load_resources(args.resources)


@contextlib.contextmanager
def _audit_streams(names: list[str]) -> Iterator[list[BinaryIO]]:
    with contextlib.ExitStack() as stack:
        streams: list[BinaryIO] = []
        for name in names:
            if name == "-":
                streams.append(sys.stdin.buffer)
                continue
            try:
                streams.append(stack.enter_context(open(name, "rb")))
            except OSError as exc:
                raise InputError(f"{name}: cannot read: {exc.strerror}") from None
        yield streams


def _access_review(args: argparse.Namespace, out: TextIO) -> int:
    if args.max_window_days < 1 or args.min_denials < 1:
        raise InputError("--max-window-days and --min-denials must be at least 1")
    settings = ReviewSettings(
        at=parse_at(args.at).timestamp(),
        max_window=args.max_window_days * DAY,
        min_denials=args.min_denials,
    )
    if args.plots is not None:
        pyplot()  # before reading a million lines: fail now if matplotlib is missing
    resources = _resources(args)
    if args.service is not None and "/" not in args.service:
        raise InputError(f"--service {args.service!r}: expected NAMESPACE/NAME")
    stats = ReadStats()
    with _audit_streams(args.audit) as streams:
        result = review(
            resources, read_records(streams, stats), stats, settings, service=args.service
        )
    if args.plots is not None:
        for path in render_plots(result, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    render = {"table": render_table, "json": render_json, "yaml": render_yaml}[args.output]
    out.write(render(result))
    return EXIT_FINDINGS if result.finding_count else EXIT_CLEAN


def run_access_review(args: argparse.Namespace) -> int:
    """`nhigate access-review`: 0 nothing found, 1 findings, 2 bad input."""
    try:
        return _access_review(args, sys.stdout)
    except (InputError, ResourceError, PlotsUnavailable) as exc:
        sys.stdout.flush()
        print(f"nhigate access-review: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, EOFError) as exc:  # e.g. a truncated gzip file
        print(f"nhigate access-review: error: reading the audit: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
