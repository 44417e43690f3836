"""Attack tests: replaying a token of a deleted or replaced service account, or of a deleted
pod, through the running proxy (policy documents with live identities, real signed tokens)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, NoReturn

from jwt_factory import kubernetes_claims, sign

from conftest import ProxyHarness
from nhigate.policy import (
    Grant,
    LiveIdentities,
    LiveServiceAccount,
    Rule,
    ServiceAccountSubject,
    ServiceConfig,
    compile_policy,
    make_document,
    pack_document,
)
from nhigate.proxy.policy_source import ClusterSource, PolicyHolder

SA_UID, NEW_SA_UID = "3f0c2a4e-6f3c-4b1e-9d3e-0a1b2c3d4e5f", "77777777-6f3c-4b1e-9d3e-0a1b2c3d4e5f"
POD_UID = "9a8b7c6d-0000-4000-8000-000000000001"  # the pod `kubernetes_claims` binds to
GRANT = Grant(
    name="payments/ci",
    subjects=(ServiceAccountSubject("sa-eval", "ci-bot"),),
    rules=(Rule(frozenset({"GET"}), ("/v1/items/**",)),),
)
SERVICE = ServiceConfig(
    namespace="payments", name="payments-api", backend_service="api", backend_port=8080
)


def publish(proxy: ProxyHarness, kit: SimpleNamespace, live: LiveIdentities) -> None:
    issuer = kit.issuer_config(proxy.key, name="cluster", kubernetes=True)
    proxy.holder.swap(compile_policy(make_document(SERVICE, (issuer,), (GRANT,), (), live)))


def snapshot(
    proxy: ProxyHarness, uid: str | None, pods: tuple[str, ...], retired: tuple[str, ...] = ()
) -> LiveIdentities:
    return LiveIdentities(
        observed_at=proxy.clock() - 5,
        service_accounts=(LiveServiceAccount("sa-eval", "ci-bot", uid),),
        pods=pods,
        retired=retired,
    )


def token(proxy: ProxyHarness, kit: SimpleNamespace, uid: str, **kw: Any) -> dict[str, str]:
    claims = kubernetes_claims(
        kit.issuer, kit.audience, "sa-eval", "ci-bot", uid, now=proxy.clock() - 60, **kw
    )
    return {"Authorization": "Bearer " + sign(proxy.key, claims)}


async def status(proxy: ProxyHarness, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=headers) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_replayed_tokens_of_retired_accounts_and_pods_are_refused(
    proxy: ProxyHarness, kit: SimpleNamespace
) -> None:
    bound = token(proxy, kit, SA_UID)  # bound to pod POD_UID
    unbound = token(proxy, kit, SA_UID, pod=None)
    publish(proxy, kit, snapshot(proxy, SA_UID, (POD_UID,)))
    assert (await status(proxy, bound))[0] == 200
    forwarded = len(proxy.upstream.requests)

    # the pod is deleted: its bound token ends, the account's other token does not
    publish(proxy, kit, snapshot(proxy, SA_UID, (), retired=(POD_UID,)))
    code, headers = await status(proxy, bound)
    assert code == 401
    assert 'error_description="identity_retired"' in headers["WWW-Authenticate"]
    assert (await status(proxy, unbound))[0] == 200

    # the account is deleted, then recreated under its name: old tokens stay refused
    publish(proxy, kit, snapshot(proxy, None, (), retired=(POD_UID, SA_UID)))
    assert (await status(proxy, unbound))[0] == 401
    publish(proxy, kit, snapshot(proxy, NEW_SA_UID, (), retired=(POD_UID, SA_UID)))
    assert (await status(proxy, unbound))[0] == 401
    assert (await status(proxy, token(proxy, kit, NEW_SA_UID, pod=None)))[0] == 200

    # a token without the service-account uid cannot be checked: refused
    publish(proxy, kit, snapshot(proxy, NEW_SA_UID, ()))
    claims = kubernetes_claims(kit.issuer, kit.audience, "sa-eval", "ci-bot", pod=None)
    del claims["kubernetes.io"]["serviceaccount"]["uid"]
    no_uid = {"Authorization": "Bearer " + sign(proxy.key, claims)}
    assert (await status(proxy, no_uid))[0] == 401

    records = await proxy.wait_audit(7)
    refused = [r for r in records if r["reason"] == "identity_retired"]
    assert [r["status"] for r in refused] == [401, 401, 401, 401]
    assert refused[0]["detail"] == f"pod uid {POD_UID} (service account sa-eval/ci-bot) was deleted"
    assert refused[1]["detail"] == f"service account sa-eval/ci-bot uid {SA_UID} was deleted"
    assert "without its uid" in refused[3]["detail"]
    # none of the refused requests reached the backend
    assert len(proxy.upstream.requests) == forwarded + 2


async def test_a_new_pod_newer_than_the_snapshot_is_not_locked_out(
    proxy: ProxyHarness, kit: SimpleNamespace
) -> None:
    publish(proxy, kit, snapshot(proxy, SA_UID, ()))  # the pod is not listed yet
    claims = kubernetes_claims(kit.issuer, kit.audience, "sa-eval", "ci-bot", SA_UID)
    fresh = {"Authorization": "Bearer " + sign(proxy.key, claims)}  # iat: now, after the list
    assert (await status(proxy, fresh))[0] == 200
    old = token(proxy, kit, SA_UID)  # issued before the list, for a pod it did not find
    assert (await status(proxy, old))[0] == 401


class VanishingApi:
    """Lists the policy ConfigMap once, then is unreachable (every list and watch fails)."""

    def __init__(self, configmap: dict[str, Any]) -> None:
        self.configmap = configmap
        self.calls = 0
        self.failed_retries = asyncio.Event()
        """Set once the source has failed to reach it a few times after loading."""

    def _fail(self) -> NoReturn:
        self.calls += 1
        if self.calls >= 4:
            self.failed_retries.set()
        raise ConnectionError("API server unreachable")

    async def list(self, ref: Any, namespace: Any = None, **kw: Any) -> Any:
        if self.calls == 0:
            self.calls += 1
            return [self.configmap], "1"
        self._fail()

    async def watch(self, ref: Any, namespace: Any = None, **kw: Any) -> AsyncIterator[Any]:
        self._fail()
        yield  # pragma: no cover - makes this an async generator


async def test_a_replica_cut_off_from_the_api_keeps_refusing_on_its_own_terms(
    proxy: ProxyHarness, kit: SimpleNamespace
) -> None:
    """What docs/security.md promises while a replica cannot learn about deletions: what its
    last snapshot retired stays refused; a token newer than it is judged by its own expiry."""
    old = token(proxy, kit, SA_UID, pod=None)
    issuer = kit.issuer_config(proxy.key, name="cluster", kubernetes=True)
    live = snapshot(proxy, NEW_SA_UID, (), retired=(SA_UID,))
    document = make_document(SERVICE, (issuer,), (GRANT,), (), live)
    configmap = {
        "metadata": {"name": "nhigate-payments-api-policy", "resourceVersion": "1"},
        "binaryData": {"policy.json.gz": base64.b64encode(pack_document(document)).decode()},
    }
    api = VanishingApi(configmap)
    holder = PolicyHolder()
    holder.subscribe(proxy.holder.swap)  # the proxy serves what this source loads
    source = ClusterSource(api, "payments", "nhigate-payments-api-policy", holder)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(api.failed_retries.wait(), 10)  # loaded, then cut off
        assert proxy.holder.current is not None
        assert proxy.holder.current.version == document.version
        assert (await status(proxy, old))[0] == 401
        claims = kubernetes_claims(
            kit.issuer, kit.audience, "sa-eval", "ci-bot", "a-newer-account-uid", pod=None
        )
        newer = {"Authorization": "Bearer " + sign(proxy.key, claims)}
        assert (await status(proxy, newer))[0] == 200  # issued after the snapshot
        proxy.clock.offset += 700  # ... until its own exp (10 min + 30 s skew), proxy's clock
        assert (await status(proxy, newer))[0] == 401
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
