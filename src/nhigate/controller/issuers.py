"""IdentityIssuer sync: fetch and validate each issuer's JWKS, write its status, keep
refreshing it, and hold the keys last loaded (`IssuerSync`, owned by the `Controller`).

Each issuer is synced on its own coalescing `WorkQueue` (one sync per issuer at a time),
re-checked every `issuer_check_interval` and refetched once its `refreshInterval` is due.
A failed fetch keeps serving the keys loaded before (the status says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import ValidationError

from nhigate.api import conditions as c
from nhigate.api.durations import parse_duration
from nhigate.api.models import IdentityIssuer, IdentityIssuerStatus, ProtectedService
from nhigate.api.resources import describe_validation_error
from nhigate.controller.jwks import InvalidJwks, validate_jwks
from nhigate.controller.settings import ControllerSettings
from nhigate.controller.status import condition
from nhigate.controller.status_writer import StatusWriter
from nhigate.controller.workqueue import Aspect, Key, SyncFn, WorkQueue
from nhigate.k8s import IDENTITYISSUERS, KubeClient, KubeError
from nhigate.policy.times import format_seconds, parse_optional

JSON = dict[str, Any]


@dataclass
class IssuerKeys:
    """The keys last loaded for one issuer."""

    jwks: JSON
    count: int
    fetched_at: float


class IssuerSync:
    """The IdentityIssuers of one controller process: their keys, status and refresh timers."""

    def __init__(
        self,
        client: KubeClient,
        settings: ControllerSettings,
        *,
        status: StatusWriter,
        work_queue: Callable[[SyncFn], WorkQueue],
        keys_changed: Callable[[str], None],
        logger: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        """`work_queue(sync)` makes the issuers' queue (the controller's backoff and clock);
        `keys_changed(namespace)` is called when an issuer's keys change (its services must
        recompile)."""
        self.client = client
        self.settings = settings
        self.log = logger
        self.clock = clock
        self.status = status
        self._keys_changed = keys_changed
        self.queue = work_queue(self._sync)
        self._keys: dict[tuple[str, str], IssuerKeys] = {}
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Stop the worker and timers; close the JWKS HTTP session."""
        await self.queue.close()
        if self._http is not None:
            await self._http.close()

    async def reconcile(self, namespace: str, name: str) -> None:
        """Fetch and validate an IdentityIssuer's keys now; write its status; keep refreshing."""
        await self.queue.request((namespace, name), Aspect.INFRA)

    def forget(self, namespace: str, name: str) -> None:
        """The issuer was deleted: drop its keys and timers."""
        self._keys.pop((namespace, name), None)
        self.queue.forget((namespace, name))

    async def kubernetes_keys(
        self, ps: ProtectedService, issuers: list[IdentityIssuer]
    ) -> dict[str, JSON]:
        """Keys of the service's `kubernetes` issuers (fetched now if never fetched)."""
        keys: dict[str, JSON] = {}
        for issuer in issuers:
            if issuer.name not in ps.spec.issuers or issuer.spec.kubernetes is None:
                continue
            known = self._keys.get((issuer.namespace, issuer.name))
            if known is None:
                try:
                    jwks = validate_jwks(await self.client.get_raw("/openid/v1/jwks"))
                except (KubeError, InvalidJwks) as exc:
                    self.log.warning("kubernetes issuer %s: %s", issuer.key, exc)
                    continue
                known = IssuerKeys(jwks, len(jwks["keys"]), self.clock())
                self._keys[(issuer.namespace, issuer.name)] = known
            keys[issuer.name] = known.jwks
        return keys

    async def _sync(self, key: Key, aspects: Aspect) -> None:
        body = await self.client.get(IDENTITYISSUERS, key[1], key[0])
        if body is None:
            self.queue.forget(key)
            return
        await self._reconcile(body, force=bool(aspects & Aspect.INFRA))
        when = self.clock() + self.settings.issuer_check_interval
        self.queue.request_at(key, Aspect.POLICY, when, slot="refresh")

    async def _reconcile(self, body: Mapping[str, Any], *, force: bool) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        now = self.clock()
        status = body.get("status") or {}
        known = self._keys.get((namespace, name))
        try:
            issuer = IdentityIssuer.model_validate(body)
        except ValidationError as exc:
            message = "invalid spec: " + "; ".join(describe_validation_error(exc))
            await self._write_status(body, False, c.REASON_INVALID_SPEC, message, known, None)
            return
        interval = parse_duration(issuer.spec.refresh_interval).total_seconds()
        last = parse_optional(status.get("lastRefreshTime"))
        generation_seen = status.get("observedGeneration") == issuer.metadata.generation
        due = (
            force or known is None or not generation_seen or last is None or now - last >= interval
        )
        if not due:
            return
        try:
            jwks = validate_jwks(await self._fetch_jwks(issuer))
        except InvalidJwks as exc:
            await self._failed(body, c.REASON_INVALID_KEYS, str(exc), known)
            return
        except (KubeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            await self._failed(body, c.REASON_FETCH_FAILED, str(exc) or repr(exc), known)
            return
        fresh = IssuerKeys(jwks, len(jwks["keys"]), now)
        self._keys[(namespace, name)] = fresh
        count = fresh.count
        message = f"{count} key{'s' if count != 1 else ''} loaded"
        await self._write_status(body, True, c.REASON_KEYS_LOADED, message, fresh, now)
        if known is None or known.jwks != jwks:
            self._keys_changed(namespace)

    async def _failed(
        self, body: Mapping[str, Any], reason: str, message: str, known: IssuerKeys | None
    ) -> None:
        if known is not None:
            fetched = format_seconds(known.fetched_at)
            message += f"; still serving the {known.count} keys fetched at {fetched}"
        await self._write_status(body, False, reason, message, known, None)
        meta = body.get("metadata") or {}
        self.log.warning(
            "IdentityIssuer %s/%s: %s", meta.get("namespace"), meta.get("name"), message
        )

    async def _fetch_jwks(self, issuer: IdentityIssuer) -> bytes | JSON:
        spec = issuer.spec
        if spec.jwks is not None:
            inline: JSON = spec.jwks.model_dump(mode="json", exclude_none=True)
            return inline
        if spec.kubernetes is not None:
            return await self.client.get_raw("/openid/v1/jwks")
        if spec.jwks_uri is None:
            raise ValueError("no key source (jwksUri, jwks or kubernetes)")
        if self._http is None:
            self._http = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.settings.jwks_fetch_timeout)
        async with self._http.get(spec.jwks_uri, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {spec.jwks_uri}: HTTP {resp.status}")
            data = await resp.content.read(self.settings.jwks_max_bytes + 1)
            if len(data) > self.settings.jwks_max_bytes:
                raise ValueError(
                    f"GET {spec.jwks_uri}: larger than {self.settings.jwks_max_bytes} bytes"
                )
            return data

    async def _write_status(
        self,
        body: Mapping[str, Any],
        ok: bool,
        reason: str,
        message: str,
        keys: IssuerKeys | None,
        refreshed_at: float | None,
    ) -> None:
        previous = body.get("status") or {}
        refreshed = format_seconds(refreshed_at) if refreshed_at is not None else None
        fields = IdentityIssuerStatus.model_validate(
            {
                "key_count": keys.count if keys is not None else 0,
                "last_refresh_time": refreshed or previous.get("lastRefreshTime") or None,
                "observed_generation": (body.get("metadata") or {}).get("generation"),
            }
        )
        ready = condition(c.READY, ok, reason, message)
        await self.status.apply(IDENTITYISSUERS, body, fields, [ready])
