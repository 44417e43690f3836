"""Where the proxy's policy comes from, and how a new one is swapped in.

`PolicyHolder` holds the one current `Policy`; a swap replaces the reference
(requests already running keep the object they started with). Two sources
feed it:

- `StandaloneSource`: a directory of resource YAML, polled for mtime changes
  every `interval` seconds and compiled by the same code the controller uses.
- `ClusterSource`: the policy ConfigMap (`binaryData["policy.json.gz"]`), listed and then
  watched through `nhigate.k8s.KubeClient` from the list's resourceVersion;
  reconnects with capped exponential backoff and relists on `WatchExpired`.

An invalid new document never replaces the last good policy: it is logged and
counted (`policy_reloads_total{result="error"}`).

`LeaseReporter` is how a replica tells the controller which version it serves:
a `coordination.k8s.io` Lease per replica (server-side applied, renewed every
`interval` seconds and on every swap). A Lease needs only create/get/update/
patch on leases in the namespace, no broad RBAC. The same Lease carries the replica's grant
usage (`nhigate.io/usage`, docs/usage.md).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nhigate.policy import (
    GrantReuse,
    Policy,
    PolicyDocument,
    PolicyDocumentError,
    compile_policy,
    unpack_document,
)
from nhigate.policy import decode_document as decode_policy_document
from nhigate.policy.times import format_micro
from nhigate.policy.usage import (
    HOUR,
    USAGE_ANNOTATION,
    UsageReportError,
    decode_report,
    encode_report,
)
from nhigate.proxy.usage import UsageRecorder

log = logging.getLogger(__name__)

PolicyListener = Callable[[Policy], None]

RESOURCE_SUFFIXES = (".yaml", ".yml", ".json")
POLICY_CONFIGMAP_KEY = "policy.json.gz"
"""Key in the policy ConfigMap's binaryData: the gzipped document (`pack_document`)."""


class PolicyHolder:
    """The current policy (None until the first valid one) and who to tell on a swap."""

    def __init__(self) -> None:
        self.current: Policy | None = None
        self._listeners: list[PolicyListener] = []
        self.swaps = 0

    def subscribe(self, listener: PolicyListener) -> None:
        """Call `listener(policy)` after every swap (and now, if a policy is loaded)."""
        self._listeners.append(listener)
        if self.current is not None:
            listener(self.current)

    def swap(self, policy: Policy) -> bool:
        """Install `policy` unless it is the version already served; True when swapped."""
        current = self.current
        if current is not None and current.version == policy.version:
            return False
        self.current = policy
        self.swaps += 1
        for listener in self._listeners:
            try:
                listener(policy)
            except Exception:
                log.exception("policy listener failed")
        return True


ReloadCallback = Callable[[str], None]
"""Told the result of every load attempt: `loaded`, `unchanged` or `error`."""


def compile_document_bytes(data: bytes) -> Policy:
    """Decode and compile a `policy.json`; raises `PolicyDocumentError`/`ValueError`."""
    return compile_policy(decode_policy_document(data))


def _compile_packed(packed: str, reuse: GrantReuse, previous: Policy | None) -> Policy:
    """A policy ConfigMap's base64 `policy.json.gz`, unpacked and compiled. What did not
    change since the last reload is reused: grants by their text (`reuse`), the index of
    each subject whose grants are unchanged (`previous`, the policy being replaced)."""
    doc = unpack_document(base64.b64decode(packed, validate=True), reuse=reuse)
    return compile_policy(doc, previous)


def _resource_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in RESOURCE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _snapshot(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every resource file; any change triggers a reload."""
    out = []
    for path in _resource_files(directory):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_standalone_document(directory: Path, service: str | None, now: float) -> PolicyDocument:
    """Compile the resources in `directory` into the policy document for `service`
    (optional when the directory defines exactly one ProtectedService)."""
    from nhigate.api.resources import load_resources

    resources = load_resources(_resource_files(directory))
    return resources.policy_document_for(service, datetime.fromtimestamp(now, UTC))


class StandaloneSource:
    """Polls a resource directory and swaps in the compiled policy when files change."""

    def __init__(
        self,
        directory: Path,
        service: str | None,
        holder: PolicyHolder,
        *,
        interval: float = 1.0,
        clock: Callable[[], float],
        on_reload: ReloadCallback | None = None,
    ) -> None:
        self._directory = directory
        self._service = service
        self._holder = holder
        self._interval = interval
        self._clock = clock
        self._on_reload = on_reload or (lambda _result: None)
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self.last_error: str | None = None

    async def load_once(self) -> bool:
        """Reload if the directory changed; True when a new policy was swapped in."""
        snapshot = await asyncio.to_thread(_snapshot, self._directory)
        if snapshot == self._seen:
            return False
        self._seen = snapshot
        try:
            policy = await asyncio.to_thread(self._compile)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "resources in %s are invalid, keeping the last good policy: %s",
                self._directory,
                self.last_error,
            )
            self._on_reload("error")
            return False
        self.last_error = None
        swapped = self._holder.swap(policy)
        self._on_reload("loaded" if swapped else "unchanged")
        if swapped:
            log.info("loaded policy %s from %s", policy.version, self._directory)
        return swapped

    def _compile(self) -> Policy:
        return compile_policy(
            load_standalone_document(self._directory, self._service, self._clock())
        )

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            try:
                await self.load_once()
            except Exception:
                log.exception("polling %s failed", self._directory)
            await asyncio.sleep(self._interval)


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self._initial = initial
        self._cap = cap
        self._attempt = 0

    def reset(self) -> None:
        """After a success."""
        self._attempt = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt."""
        ceiling = min(self._cap, self._initial * (2**self._attempt))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


POLICY_WATCH_BACKOFF = (0.25, 3.0)
"""(first, longest) retry delay of the policy watch, in seconds. Short on purpose: while the
watch is down, deleted grants and new revocations do not reach this replica."""


class ClusterSource:
    """Lists and watches the policy ConfigMap; swaps in each valid packed policy."""

    def __init__(
        self,
        client: Any,
        namespace: str,
        configmap: str,
        holder: PolicyHolder,
        *,
        on_reload: ReloadCallback | None = None,
        watch_timeout: int = 60,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._name = configmap
        self._holder = holder
        self._on_reload = on_reload or (lambda _result: None)
        self._watch_timeout = watch_timeout
        self._seen_rv: str | None = None
        self._reuse = GrantReuse()  # used by one reload at a time (`_apply` awaits each)

    async def _apply(self, configmap: dict[str, Any]) -> None:
        metadata = configmap.get("metadata") or {}
        rv = metadata.get("resourceVersion")
        if rv is not None and rv == self._seen_rv:
            return
        self._seen_rv = rv
        packed = (configmap.get("binaryData") or {}).get(POLICY_CONFIGMAP_KEY)
        if not isinstance(packed, str):
            log.error(
                "ConfigMap %s has no %s: keeping the last good policy",
                self._name,
                POLICY_CONFIGMAP_KEY,
            )
            self._on_reload("error")
            return
        try:
            # Off the event loop: unpacking and compiling 10k grants takes ~0.1-0.4 s of CPU.
            policy = await asyncio.to_thread(
                _compile_packed, packed, self._reuse, self._holder.current
            )
        except (PolicyDocumentError, ValueError) as exc:
            log.error(
                "ConfigMap %s holds an invalid policy, keeping the last one: %s", self._name, exc
            )
            self._on_reload("error")
            return
        swapped = self._holder.swap(policy)
        self._on_reload("loaded" if swapped else "unchanged")
        if swapped:
            log.info("loaded policy %s from ConfigMap %s", policy.version, self._name)

    async def run(self) -> None:
        """List, then watch from the list's resourceVersion; forever (cancel to stop)."""
        from nhigate.k8s import CONFIGMAPS, WatchExpired

        selector = f"metadata.name={self._name}"
        backoff = Backoff(*POLICY_WATCH_BACKOFF)
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    items, resource_version = await self._client.list(
                        CONFIGMAPS, self._namespace, field_selector=selector
                    )
                    backoff.reset()
                    for item in items:
                        await self._apply(item)
                    if not items:
                        log.warning("ConfigMap %s/%s not found yet", self._namespace, self._name)
                async for event in self._client.watch(
                    CONFIGMAPS,
                    self._namespace,
                    resource_version=resource_version,
                    field_selector=selector,
                    timeout_seconds=self._watch_timeout,
                ):
                    backoff.reset()
                    rv = (event.object.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        resource_version = rv
                    if event.type in ("ADDED", "MODIFIED"):
                        await self._apply(event.object)
                    elif event.type == "DELETED":
                        log.warning(
                            "ConfigMap %s deleted: keeping the last good policy", self._name
                        )
            except asyncio.CancelledError:
                raise
            except WatchExpired:
                log.info("watch of %s expired: relisting", self._name)
                resource_version = None
            except Exception as exc:
                delay = backoff.next_delay()
                log.warning(
                    "watching ConfigMap %s failed (%s); retrying in %.1fs", self._name, exc, delay
                )
                await asyncio.sleep(delay)


def lease_name(service: str, replica: str) -> str:
    """The name of a replica's Lease."""
    return f"nhigate-{service}-{replica}"


def lease_manifest(
    namespace: str,
    service: str,
    replica: str,
    version: str,
    now: float,
    usage: str | None = None,
) -> dict[str, Any]:
    """The Lease a replica applies to report the policy version it serves and, when given,
    its encoded usage report (`nhigate.policy.usage`)."""
    annotations = {"nhigate.io/policy-version": version}
    if usage is not None:
        annotations[USAGE_ANNOTATION] = usage
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(service, replica),
            "namespace": namespace,
            "labels": {"nhigate.io/protected-service": service},
            "annotations": annotations,
        },
        "spec": {
            "holderIdentity": replica,
            "leaseDurationSeconds": 15,
            "renewTime": format_micro(now),
        },
    }


class LeaseReporter:
    """Renews this replica's Lease every `interval` seconds and right after every swap.

    With a `usage` recorder, the Lease also carries its usage report; before the first
    report the previous process's report on the same Lease is adopted (a restart carries
    counts on: none lost beyond the last interval, none counted twice)."""

    def __init__(
        self,
        client: Any,
        namespace: str,
        replica: str,
        holder: PolicyHolder,
        *,
        interval: float = 5.0,
        clock: Callable[[], float],
        usage: UsageRecorder | None = None,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._replica = replica
        self._holder = holder
        self._interval = interval
        self._clock = clock
        self._usage = usage
        self._adopted = usage is None
        self._encoded: tuple[tuple[int, int], str] | None = None
        """((recorder revision, hour), annotation) of the last report: reused while equal."""
        self._wake = asyncio.Event()
        self.reports = 0
        holder.subscribe(lambda _policy: self._wake.set())

    async def _adopt_previous(self, service: str) -> None:
        """Take over the usage the previous process of this replica reported."""
        from nhigate.k8s import LEASES

        assert self._usage is not None
        lease = await self._client.get(LEASES, lease_name(service, self._replica), self._namespace)
        text = (((lease or {}).get("metadata") or {}).get("annotations") or {}).get(
            USAGE_ANNOTATION
        )
        if text:
            try:
                self._usage.adopt(decode_report(str(text)), self._clock())
            except UsageReportError as exc:
                log.warning("ignoring the unreadable usage report on this replica's Lease: %s", exc)
        self._adopted = True

    async def report_once(self) -> bool:
        """Apply the Lease for the current policy; False when there is none yet."""
        policy = self._holder.current
        if policy is None:
            return False
        document: PolicyDocument = policy.document
        if not self._adopted:
            await self._adopt_previous(document.service.name)
        now = self._clock()
        usage = await self._usage_annotation(now) if self._usage is not None else None
        manifest = lease_manifest(
            self._namespace,
            document.service.name,
            self._replica,
            policy.version,
            now,
            usage,
        )
        await self._client.apply(manifest, field_manager="nhigate-proxy")
        self.reports += 1
        return True

    async def _usage_annotation(self, now: float) -> str:
        """The encoded usage report; encoded off the event loop (a full table takes a
        noticeable fraction of a second) and only when something changed."""
        assert self._usage is not None
        stamp = (self._usage.revision, int(now) // HOUR)
        if self._encoded is not None and self._encoded[0] == stamp:
            return self._encoded[1]
        text = await asyncio.to_thread(encode_report, self._usage.report(now))
        self._encoded = (stamp, text)
        return text

    async def run(self) -> None:
        """Report forever (cancel to stop); failures are logged and retried next tick."""
        while True:
            self._wake.clear()
            try:
                await self.report_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reporting Lease for %s failed: %s", self._replica, exc)
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
