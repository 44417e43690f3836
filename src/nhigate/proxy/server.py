"""Run the proxy: data-plane and admin listeners, policy sources, signals, graceful shutdown.

Shutdown order (SIGTERM/SIGINT): readiness turns false, `shutdown_delay`
passes (so endpoints stop sending traffic), the listener closes and in-flight
requests get `drain_timeout` seconds to finish, then everything is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import uvloop
from aiohttp import web

from nhigate.proxy.admin import create_admin_app
from nhigate.proxy.aiohttp_seam import bound_port
from nhigate.proxy.factory import create_app
from nhigate.proxy.http1 import NativeRunner
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.policy_source import (
    ClusterSource,
    LeaseReporter,
    PolicyHolder,
    StandaloneSource,
)
from nhigate.proxy.rejects import rejected_request_audit
from nhigate.proxy.runner import ProxyRunner
from nhigate.proxy.settings import ProxySettings
from nhigate.proxy.state import STATE, ProxyState
from nhigate.proxy.usage import UsageRecorder

log = logging.getLogger(__name__)


def server_ssl_context(settings: ProxySettings) -> ssl.SSLContext | None:
    """TLS for the proxied port; client certificates are optional unless a CA is given."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.upstream_protocol == "http2":  # HTTP/2 only: HTTP/1.1 would get 505 anyway
        context.set_alpn_protocols(["h2"])
    if settings.client_ca is not None:
        context.load_verify_locations(cafile=str(settings.client_ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


async def _start_sources(
    state: ProxyState, settings: ProxySettings
) -> tuple[list[asyncio.Task[None]], Callable[[], Awaitable[None]]]:
    """Start the policy source(s); returns their tasks and a closer for the API client."""
    holder = state.holder
    metrics = state.metrics

    def on_reload(result: str) -> None:
        metrics.policy_reloads.labels(result).inc()

    tasks: list[asyncio.Task[None]] = []
    if settings.resources_dir is not None:
        source = StandaloneSource(
            settings.resources_dir,
            settings.service,
            holder,
            interval=settings.reload_interval,
            clock=state.clock,
            on_reload=on_reload,
        )
        await source.load_once()
        tasks.append(asyncio.create_task(source.run(), name="nhigate-standalone-policy"))

        async def nothing() -> None:
            return None

        return tasks, nothing
    if settings.kube:
        from nhigate.k8s import KubeClient

        assert settings.namespace is not None
        assert settings.policy_configmap is not None
        client = await KubeClient.connect(settings.kubeconfig)
        cluster = ClusterSource(
            client, settings.namespace, settings.policy_configmap, holder, on_reload=on_reload
        )
        tasks.append(asyncio.create_task(cluster.run(), name="nhigate-policy-watch"))
        if settings.replica_name:
            reporter = LeaseReporter(
                client,
                settings.namespace,
                settings.replica_name,
                holder,
                interval=settings.lease_interval,
                clock=state.clock,
                usage=state.usage,
            )
            tasks.append(asyncio.create_task(reporter.run(), name="nhigate-lease"))
        return tasks, client.close
    log.warning("no policy source (--resources or --kube): every request is denied with 503")

    async def nothing_else() -> None:
        return None

    return tasks, nothing_else


async def serve(
    settings: ProxySettings,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.time,
    holder: PolicyHolder | None = None,
    on_started: Callable[[int, int], None] | None = None,
) -> None:
    """Serve until `stop` is set, then shut down gracefully. `on_started(port, admin_port)`.

    `holder` may carry a pre-loaded policy (benchmarks, embedding); sources still feed it.
    """
    holder = holder if holder is not None else PolicyHolder()
    app = create_app(settings, holder=holder, metrics=ProxyMetrics(), clock=clock)
    state = app[STATE]
    if settings.workers > 1:  # the workers share one Lease: each report is partial
        state.usage = UsageRecorder(complete=False)
    runner: ProxyRunner | NativeRunner
    if settings.http1_server == "native":
        runner = NativeRunner(app, shutdown_timeout=settings.drain_timeout)
    else:
        runner = ProxyRunner(
            app,
            handle_signals=False,
            shutdown_timeout=settings.drain_timeout,
            **rejected_request_audit(app),  # parser-refused requests are audited too
        )
    # The admin port (probes, metrics, JWKS) has no connection guard, but aiohttp's keep-alive
    # timer closes a connection still waiting for a complete request head when it fires, so
    # a silent or trickling client there is cut as well (connections.py, docs/proxy.md).
    admin_runner = web.AppRunner(
        create_admin_app(app),
        handle_signals=False,
        access_log=None,
        keepalive_timeout=min(settings.request_head_timeout, settings.idle_timeout),
    )
    await runner.setup()
    await admin_runner.setup()
    reuse = settings.workers > 1
    site: web.TCPSite | None = None
    if isinstance(runner, ProxyRunner):
        site = web.TCPSite(
            runner,
            settings.listen_host,
            settings.listen_port,
            ssl_context=server_ssl_context(settings),
            backlog=1024,
            reuse_port=reuse or None,
        )
    admin_site = web.TCPSite(
        admin_runner, settings.admin_host, settings.admin_port, reuse_port=reuse or None
    )
    tasks, close_client = await _start_sources(state, settings)
    try:
        if site is not None:
            await site.start()
            port = bound_port(site)
        else:
            assert isinstance(runner, NativeRunner)
            port = await runner.start(
                settings.listen_host,
                settings.listen_port,
                ssl_context=server_ssl_context(settings),
                backlog=1024,
                reuse_port=reuse or None,
            )
        await admin_site.start()
        if on_started is not None:
            on_started(port, bound_port(admin_site))
        log.info(
            "nhigate proxy on %s:%d -> %s (admin %s:%d)",
            settings.listen_host,
            settings.listen_port,
            settings.upstream.url,
            settings.admin_host,
            settings.admin_port,
        )
        await stop.wait()
        log.info("shutting down: readiness off, draining %d in-flight", state.inflight)
        state.draining = True
        state.metrics.ready.set(0)
        if settings.shutdown_delay > 0:
            await asyncio.sleep(settings.shutdown_delay)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await runner.cleanup()  # stops accepting, drains in-flight (bounded), runs cleanup_ctx
        await admin_runner.cleanup()
        await close_client()


async def _main(settings: ProxySettings, holder: PolicyHolder | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop, holder=holder)


def _worker(settings: ProxySettings) -> None:
    uvloop.run(_main(settings))


def run(settings: ProxySettings, *, holder: PolicyHolder | None = None) -> int:
    """Run the proxy in the foreground (uvloop); `workers > 1` spawns SO_REUSEPORT workers."""
    if settings.workers == 1:
        uvloop.run(_main(settings, holder))
        return 0
    context = multiprocessing.get_context("spawn")
    worker_settings = replace(settings)
    processes = [
        context.Process(target=_worker, args=(worker_settings,), name=f"nhigate-proxy-{i}")
        for i in range(settings.workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, _frame: object) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    import os

                    os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    return max((p.exitcode or 0) for p in processes)
