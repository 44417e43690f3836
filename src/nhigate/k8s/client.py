"""`KubeClient`: the one typed place that talks to the Kubernetes API.

Built on kubernetes_asyncio for configuration loading (kubeconfig or in-cluster,
including token refresh) and its ApiClient as the authenticated transport;
objects are plain JSON dicts. Every call goes through `_request`, which turns
non-2xx answers into `KubeError` carrying the API's own Status reason/message.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from nhigate.k8s.resources import ResourceRef, ref_of

JSON = dict[str, Any]

_APPLY_CONTENT_TYPE = "application/apply-patch+yaml"  # JSON is valid YAML
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)


class KubeError(Exception):
    """A non-2xx answer from the API server (or a transport failure, status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class WatchExpired(KubeError):  # noqa: N818 - name fixed by the k8s client contract
    """The requested resourceVersion is too old (HTTP 410 Gone): list again, then watch."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a watch stream."""

    type: str
    """ADDED, MODIFIED, DELETED or BOOKMARK."""
    object: JSON


def _error_from_body(status: int, body: bytes) -> KubeError:
    """Build the right KubeError from a Status (or any) response body."""
    reason, message = "", body.decode("utf-8", "replace")[:2000]
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        reason = str(parsed.get("reason", ""))
        message = str(parsed.get("message", message))
    cls = WatchExpired if status == 410 else KubeError
    return cls(status, reason or "Unknown", message)


class KubeClient:
    """Async client for the Kubernetes API, JSON in and out.

    Create with `await KubeClient.connect(...)`, release with `await close()`.
    """

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self._api = api

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        """Load credentials and return a connected client.

        The given kubeconfig file; else in-cluster when KUBERNETES_SERVICE_HOST
        is set; else the default kubeconfig ($KUBECONFIG, ~/.kube/config).
        """
        configuration = k8s_client.Configuration()
        if kubeconfig is not None:
            await k8s_config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(client_configuration=configuration)
        return cls(k8s_client.ApiClient(configuration))

    @property
    def host(self) -> str:
        """The API server URL this client talks to."""
        return str(self._api.configuration.host)

    @property
    def configuration(self) -> Any:
        """The loaded kubernetes_asyncio Configuration (host, CA, client cert, token)."""
        return self._api.configuration

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        await self._api.close()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ---------------------------------------------------------------------------

    async def _open(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        client_timeout: aiohttp.ClientTimeout = _REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        """Send one request; the caller owns (and must release) the response."""
        try:
            response: aiohttp.ClientResponse = await self._api.call_api(
                path,
                method,
                query_params=list(query or []),
                header_params={"Content-Type": content_type, "Accept": accept},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=client_timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, type(exc).__name__, str(exc) or repr(exc)) from exc
        return response

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> bytes:
        """Send one request and return its body; KubeError on non-2xx."""
        response = await self._open(
            method, path, query=query, body=body, content_type=content_type, accept=accept
        )
        try:
            try:
                data = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise KubeError(0, type(exc).__name__, str(exc) or repr(exc)) from exc
            if not 200 <= response.status <= 299:
                raise _error_from_body(response.status, data)
            return data
        finally:
            response.release()

    async def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        data = await self._request(method, path, **kwargs)
        parsed = json.loads(data)
        if not isinstance(parsed, dict):
            raise KubeError(0, "BadResponse", f"{method} {path}: expected a JSON object")
        return parsed

    # -- the contract --------------------------------------------------------------------------

    async def get(self, ref: ResourceRef, name: str, namespace: str | None = None) -> JSON | None:
        """The object, or None when it does not exist (404)."""
        try:
            return await self._json("GET", ref.path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self,
        ref: ResourceRef,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[JSON], str]:
        """All matching objects and the list's resourceVersion (to start a watch from).

        Items get `apiVersion`/`kind` filled in (the API omits them in lists).
        """
        query = _selectors(label_selector, field_selector)
        result = await self._json("GET", ref.path(namespace), query=query)
        items: list[JSON] = list(result.get("items") or [])
        for item in items:
            item.setdefault("apiVersion", ref.api_version)
            item.setdefault("kind", ref.kind)
        return items, str(result.get("metadata", {}).get("resourceVersion", ""))

    async def watch(
        self,
        ref: ResourceRef,
        namespace: str | None = None,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[WatchEvent]:
        """Stream changes after `resource_version` until the server ends the watch.

        Bookmarks are requested and yielded (their object carries only the new
        resourceVersion). Raises WatchExpired when the version is too old.
        """
        query = _selectors(label_selector, field_selector)
        query += [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds + 30)
        response = await self._open("GET", ref.path(namespace), query=query, client_timeout=timeout)
        try:
            if not 200 <= response.status <= 299:
                raise _error_from_body(response.status, await response.read())
            try:
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = str(event.get("type", "")), event.get("object") or {}
                    if kind == "ERROR":
                        code = int(obj.get("code") or 0)
                        raise _error_from_body(code, json.dumps(obj).encode())
                    if kind != "BOOKMARK":
                        obj.setdefault("apiVersion", ref.api_version)
                        obj.setdefault("kind", ref.kind)
                    yield WatchEvent(type=kind, object=obj)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise KubeError(0, type(exc).__name__, str(exc) or repr(exc)) from exc
        finally:
            response.close()

    async def apply(self, obj: JSON, *, field_manager: str = "nhigate", force: bool = True) -> JSON:
        """Server-side apply `obj` (which names its own apiVersion/kind/namespace/name)."""
        ref = ref_of(obj)
        metadata = obj.get("metadata") or {}
        path = ref.path(metadata.get("namespace"), _name_of(obj))
        query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
        return await self._json(
            "PATCH", path, query=query, body=obj, content_type=_APPLY_CONTENT_TYPE
        )

    async def apply_status(
        self, ref: ResourceRef, obj: JSON, *, field_manager: str = "nhigate"
    ) -> JSON:
        """Server-side apply to the status subresource (always forced: status has one owner)."""
        metadata = obj.get("metadata") or {}
        body = {"apiVersion": ref.api_version, "kind": ref.kind, **obj}
        path = ref.path(metadata.get("namespace"), _name_of(obj)) + "/status"
        query = [("fieldManager", field_manager), ("force", "true")]
        return await self._json(
            "PATCH", path, query=query, body=body, content_type=_APPLY_CONTENT_TYPE
        )

    async def delete(self, ref: ResourceRef, name: str, namespace: str | None = None) -> None:
        """Delete (background propagation); a missing object is not an error."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            await self._request("DELETE", ref.path(namespace, name), body=body)
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def get_raw(self, path: str) -> bytes:
        """GET any API path (e.g. "/openid/v1/jwks") and return the body bytes."""
        return await self._request("GET", path, accept="*/*")

    # -- beyond the contract: small conveniences the controller uses ---------------------------

    async def create(self, obj: JSON) -> JSON:
        """POST a new object; KubeError 409 if it already exists."""
        ref = ref_of(obj)
        namespace = (obj.get("metadata") or {}).get("namespace")
        return await self._json("POST", ref.path(namespace), body=obj)

    async def resource_exists(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in group/version (e.g. Gateway API HTTPRoutes)."""
        try:
            found = await self._json("GET", f"/apis/{group}/{version}")
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in found.get("resources") or [])


def _selectors(label_selector: str | None, field_selector: str | None) -> list[tuple[str, str]]:
    query: list[tuple[str, str]] = []
    if label_selector:
        query.append(("labelSelector", label_selector))
    if field_selector:
        query.append(("fieldSelector", field_selector))
    return query


def _name_of(obj: JSON) -> str:
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("object has no metadata.name")
    return name
