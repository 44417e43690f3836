"""Run the controller embedded in this process (`kopf.operator`, never `kopf run <file>`)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kopf

from nhigate.controller.handlers import ControllerHolder, build_registry
from nhigate.controller.settings import ControllerSettings


def liveness_url(liveness: str | None) -> str | None:
    """`HOST:PORT` -> kopf's liveness endpoint URL (`http://HOST:PORT/healthz`)."""
    if not liveness:
        return None
    host, sep, port = liveness.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"liveness must be HOST:PORT, got {liveness!r}")
    return f"http://{host}:{port}/healthz"


async def run_controller(
    settings: ControllerSettings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    holder: ControllerHolder | None = None,
) -> None:
    """Run until `stop_flag` is set (or the task is cancelled / a signal arrives)."""
    registry = build_registry(settings, holder)
    # kopf types the identity as a NewType of str that it does not export.
    identity: Any = settings.identity
    await kopf.operator(
        registry=registry,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        standalone=not settings.peering,
        peering_name=settings.peering_name if settings.peering else None,
        priority=settings.peering_priority,
        identity=identity,  # kopf's own default needs a passwd entry for our uid
        liveness_endpoint=liveness_url(settings.liveness),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(settings: ControllerSettings) -> int:
    """Blocking entry point for `nhigate controller` (logging is set up by the caller)."""
    asyncio.run(run_controller(settings))
    return 0
