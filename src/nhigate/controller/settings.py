"""Settings of one controller process: passed in, never global."""

from __future__ import annotations

import datetime
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from nhigate.policy.kinds import GROUP

IDENTITY_ENV = ("POD_ID", "POD_NAME")
"""Environment variables naming this replica, first set wins (the chart sets both from the
downward API's metadata.name; kopf itself reads only POD_ID)."""


def default_identity(environ: Mapping[str, str] | None = None) -> str:
    """This replica's kopf peering identity: the pod name, else host, PID and start time.

    Never derived from the passwd database: kopf's own default calls `getpass.getuser()`, which
    raises KeyError when the process's uid has no passwd entry (a numeric `runAsUser`).
    """
    env = os.environ if environ is None else environ
    for name in IDENTITY_ENV:
        if env.get(name):
            return env[name]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return f"nhigate@{socket.gethostname()}/{os.getpid()}/{now}/{secrets.token_hex(2)}"


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """Everything `nhigate controller` can be told."""

    proxy_image: str
    """Image for proxy Deployments (a ProtectedService's `spec.proxy.image` overrides it)."""
    proxy_image_pull_policy: str = "IfNotPresent"
    """`imagePullPolicy` of the proxy containers: Always, IfNotPresent or Never."""
    kubeconfig: str | None = None
    """Kubeconfig file; None: in-cluster when running in a pod, else the default kubeconfig."""
    namespaces: tuple[str, ...] = ()
    """Namespaces (or kopf glob patterns) to serve; empty: the whole cluster."""
    peering: bool = False
    """Coordinate several controller replicas through kopf peering (needs the KopfPeering CRDs)."""
    peering_name: str = "nhigate"
    """The peering object's name when `peering` is on."""
    identity: str = field(default_factory=default_identity)
    """This replica's name among peers (kopf's identity): see `default_identity`."""
    peering_priority: int = field(default_factory=lambda: secrets.randbelow(1 << 30) + 1)
    """This replica's kopf peering priority: the highest serves, the others stand by.

    Distinct per replica by default: kopf pauses *every* replica whose priority ties with
    another's, so equal priorities would stop all reconciling."""
    log_level: str = "INFO"
    """Level of the controller's own log lines (kopf's per-object lines stay at WARNING)."""
    liveness: str | None = None
    """`HOST:PORT` for the liveness endpoint (`/healthz`); None: no endpoint."""
    field_manager: str = "nhigate"
    """Server-side apply field manager for everything the controller writes."""
    annotation_prefix: str = GROUP
    """Prefix of kopf's progress and diff-base annotations."""
    drift_interval: float = 60.0
    """Seconds between full re-applies of each ProtectedService (corrects manual drift)."""
    issuer_check_interval: float = 15.0
    """Seconds between checks whether an IdentityIssuer's `refreshInterval` has passed."""
    jwks_fetch_timeout: float = 10.0
    """Seconds allowed for one JWKS fetch."""
    jwks_max_bytes: int = 1024 * 1024
    """Largest JWK Set accepted from a `jwksUri`."""
    retry_min: float = 0.5
    """First retry delay after a failed sync (doubles up to `retry_max`)."""
    retry_max: float = 30.0
    """Longest retry delay after repeated failures."""
    unused_after: float = 7 * 24 * 3600.0
    """Seconds without an allowed request after which a grant is `Unused=True` (a
    ProtectedService's `spec.grantPolicy.unusedAfter` overrides it for its grants)."""
    usage_write_interval: float = 60.0
    """Least seconds between two writes of one grant's `status.usage` under steady traffic
    (first use, a newly used rule and `Unused` changes are written at once)."""
