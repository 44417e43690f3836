"""Method and path overrides cannot make the backend act on what no grant allows (issue 12,
item 1; docs/security.md#7-what-is-authorised-is-all-a-backend-can-act-on).

With a grant of `GET /v1/items/**`, a GET carrying `X-HTTP-Method-Override: DELETE` used to be
allowed and reach the backend unchanged; so did `X-Original-URL: /admin` and `?_method=DELETE`.
Now each is refused with 400 `override_rejected` (audited with the caller's identity) and the
upstream receives nothing, unless the ProtectedService declares that its backend honours
overrides: then the override must be granted as well as the request line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from nhigate.api.compile import compile_service
from nhigate.api.models import ProtectedService
from nhigate.policy import ServiceConfig
from nhigate.policy.encoding import decode_document, encode_document
from nhigate.proxy.overrides import (
    METHOD_OVERRIDE_HEADERS,
    METHOD_OVERRIDE_PARAMETERS,
    PATH_OVERRIDE_HEADERS,
)

SERVICE = {"namespace": "payments", "name": "payments-api", "backend_service": "api"}


def _variants(name: str) -> list[str]:
    """The header as a client might spell it: canonical, upper, underscored (CGI/WSGI/PHP)."""
    return [name, name.upper(), name.replace("-", "_"), name.title().replace("-", "_")]


async def _refused(proxy: Any, resp: aiohttp.ClientResponse, before: int) -> dict[str, Any]:
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"] == "override_rejected"
    assert len(proxy.upstream.requests) == before, "the upstream received an override"
    record: dict[str, Any] = (await proxy.wait_audit(1))[-1]
    assert record["decision"] == "deny"
    assert record["reason"] == "override_rejected"
    assert record["identity"]["subject"] == "ci-deployer"  # who tried is in the audit
    return record


@pytest.mark.parametrize(
    "header",
    [v for name in sorted(METHOD_OVERRIDE_HEADERS) for v in _variants(name)],
)
async def test_a_method_override_header_is_refused_and_never_reaches_the_upstream(
    proxy: Any, header: str
) -> None:
    before = len(proxy.upstream.requests)
    headers = {header: "DELETE", **proxy.auth()}
    async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=headers) as resp:
        record = await _refused(proxy, resp, before)
    assert "method override" in record["detail"]


@pytest.mark.parametrize(
    "header",
    [v for name in sorted(PATH_OVERRIDE_HEADERS) for v in _variants(name)],
)
async def test_a_path_override_header_is_refused_and_never_reaches_the_upstream(
    proxy: Any, header: str
) -> None:
    before = len(proxy.upstream.requests)
    headers = {header: "/admin", **proxy.auth()}
    async with proxy.session.get(f"{proxy.url}/v1/items/1", headers=headers) as resp:
        record = await _refused(proxy, resp, before)
    assert "path override" in record["detail"]


@pytest.mark.parametrize(
    "query",
    [
        "_method=DELETE",
        "a=1&_method=DELETE",
        "a=1;_method=PUT",
        "_METHOD=delete",
        "%5Fmethod=DELETE",
        "%5f%6d%65%74%68%6f%64=DELETE",
        ".method=DELETE",  # PHP turns `.` and space into `_`
        "+method=DELETE",
        "_method[]=DELETE",
        "_method[x]=DELETE",
        "_HttpMethod=PATCH",
        "_method_override=DELETE",
        "X-HTTP-Method-Override=DELETE",
        "x_http_method_override=DELETE",
        "_method",
    ],
)
async def test_a_method_override_query_parameter_is_refused(proxy: Any, query: str) -> None:
    before = len(proxy.upstream.requests)
    url = URL(f"{proxy.url}/v1/items/1?{query}", encoded=True)
    async with proxy.session.get(url, headers=proxy.auth()) as resp:
        await _refused(proxy, resp, before)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"amount=100&_method=DELETE"),
        ("application/x-www-form-urlencoded; charset=utf-8", b"%5Fmethod=PUT"),
        ("Application/X-WWW-Form-Urlencoded", b"a=1;_METHOD=PUT"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n',
        ),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: form-data; name*=utf-8''%5Fmethod\r\n\r\n"
            b"PUT\r\n--b--\r\n",
        ),
    ],
)
async def test_a_method_override_in_a_form_body_is_refused(
    proxy: Any, content_type: str, body: bytes
) -> None:
    before = len(proxy.upstream.requests)
    headers = {"Content-Type": content_type, **proxy.auth()}
    async with proxy.session.post(f"{proxy.url}/v1/items/1", data=body, headers=headers) as resp:
        await _refused(proxy, resp, before)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_method_override_deep_in_a_streamed_form_body_never_completes_a_request(
    proxy: Any, framing: str
) -> None:
    # Past the 64 KiB the proxy buffers, the body streams: the chunk holding `_method` is
    # never forwarded, so the upstream never has a complete request to act on.
    filler = b"note=" + b"x" * 300_000
    body = filler + b"&_method=DELETE&tail=" + b"y" * 1000

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    before = len(proxy.upstream.requests)
    headers = {"Content-Type": "application/x-www-form-urlencoded", **proxy.auth()}
    data: Any = body if framing == "content-length" else chunks()
    async with proxy.session.post(f"{proxy.url}/v1/items/1", data=data, headers=headers) as resp:
        await _refused(proxy, resp, before)


@pytest.mark.parametrize(
    ("query", "headers", "body"),
    [
        ("q=method", {}, None),
        ("methods=GET&sort=method", {}, None),
        ("a=_method", {}, None),
        ("", {"X-Method": "DELETE", "X-Http-Methods": "x", "Method": "DELETE"}, None),
        ("", {"X-Forwarded-Host": "a"}, None),
        ("", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=_method&b=method"),
        ("", {"Content-Type": "application/json"}, b'{"_method": "DELETE"}'),
    ],
)
async def test_look_alikes_that_no_backend_routes_on_are_forwarded(
    proxy: Any, query: str, headers: dict[str, str], body: bytes | None
) -> None:
    url = URL(f"{proxy.url}/v1/items/1" + (f"?{query}" if query else ""), encoded=True)
    method = "POST" if body is not None else "GET"
    async with proxy.session.request(
        method, url, data=body, headers={**headers, **proxy.auth()}
    ) as resp:
        assert resp.status == 200


async def test_the_reported_attack_get_grant_with_a_delete_override(
    kit: Any, signing_key: Any
) -> None:
    upstream, upstream_runner = await kit.start_upstream()
    proxy, runner = await kit.start_proxy(
        upstream.url,
        key=signing_key,
        upstream=upstream,
        policy_grants=(kit.grant("public", "ci-deployer", ("/api/public/**",)),),
    )
    try:
        for header in ("X-HTTP-Method-Override", "X-Method-Override"):
            async with proxy.session.get(
                f"{proxy.url}/api/public/ok", headers={header: "DELETE", **proxy.auth()}
            ) as resp:
                assert resp.status == 400
        async with proxy.session.get(
            f"{proxy.url}/api/public/ok", headers={"X-Original-URL": "/admin", **proxy.auth()}
        ) as resp:
            assert resp.status == 400
        async with proxy.session.get(
            f"{proxy.url}/api/public/ok?_method=DELETE", headers=proxy.auth()
        ) as resp:
            assert resp.status == 400
        assert upstream.requests == []
    finally:
        await proxy.session.close()
        await runner.cleanup()
        await upstream_runner.cleanup()


@pytest.fixture
async def honouring(kit: Any, signing_key: Any) -> AsyncIterator[Any]:
    """A proxy whose ProtectedService declares that the backend honours both overrides."""
    upstream, upstream_runner = await kit.start_upstream()
    proxy, runner = await kit.start_proxy(upstream.url, key=signing_key, upstream=upstream)
    service = ServiceConfig(
        **SERVICE, backend_port=8080, authorise_method_overrides=True, authorise_path_overrides=True
    )
    grants = (
        *kit.default_grants,  # GET/HEAD /v1/items/**, POST/PUT /v1/items/*
        kit.grant("public", "ci-deployer", ("/public",), frozenset({"GET"})),
    )
    proxy.holder.swap(kit.build_policy(signing_key, grants, service=service))
    yield proxy
    await proxy.session.close()
    await runner.cleanup()
    await upstream_runner.cleanup()


async def test_an_honoured_method_override_is_authorised_as_well_as_the_request_line(
    honouring: Any,
) -> None:
    proxy = honouring
    url = f"{proxy.url}/v1/items/1"
    # POST tunnelling PUT: both granted -> forwarded, with the value that was authorised.
    headers = {"X-HTTP-Method-Override": " put ", **proxy.auth()}
    async with proxy.session.post(url, data=b"{}", headers=headers) as resp:
        assert resp.status == 200
    assert proxy.upstream.last_header("X-HTTP-Method-Override") == ["PUT"]
    # GET carrying DELETE: DELETE is granted nowhere -> 403, nothing forwarded.
    before = len(proxy.upstream.requests)
    headers = {"X-HTTP-Method-Override": "DELETE", **proxy.auth()}
    async with proxy.session.get(url, headers=headers) as resp:
        assert resp.status == 403
    record = (await proxy.wait_audit(2))[-1]
    assert record["reason"] == "no_matching_grant"
    assert "override DELETE /v1/items/1 not granted" in record["detail"]
    # A PUT carrying GET: the request line (PUT) is granted, but so must the override be...
    async with proxy.session.put(
        f"{proxy.url}/public", headers={"X-HTTP-Method-Override": "GET", **proxy.auth()}
    ) as resp:
        assert resp.status == 403  # ...and PUT /public is not: the backend may ignore overrides
    # Two overrides that disagree, or one that is not a method: refused.
    for extra in (
        {"X-HTTP-Method-Override": "PUT", "X-HTTP-Method": "DELETE"},
        {"X-HTTP-Method-Override": "PU T"},
        {"X-HTTP-Method-Override": "CONNECT"},
    ):
        async with proxy.session.post(url, data=b"", headers={**extra, **proxy.auth()}) as resp:
            assert resp.status == 400, extra
    # A body `_method` is refused even here: a streamed body is forwarded before it is read.
    async with proxy.session.post(
        url,
        data=b"_method=PUT",
        headers={"Content-Type": "application/x-www-form-urlencoded", **proxy.auth()},
    ) as resp:
        assert resp.status == 400
    assert len(proxy.upstream.requests) == before


async def test_an_honoured_path_override_is_authorised_and_forwarded_canonical(
    honouring: Any,
) -> None:
    proxy = honouring
    url = f"{proxy.url}/v1/items/1"
    headers = {"X-Original-URL": "/v1/items/%2e%2e/items/2?x=1", **proxy.auth()}
    async with proxy.session.get(url, headers=headers) as resp:
        assert resp.status == 200
    assert proxy.upstream.last_header("X-Original-URL") == ["/v1/items/2?x=1"]
    before = len(proxy.upstream.requests)
    for value, status in (
        ("/admin", 403),
        ("/v1/items/../../admin", 403),
        ("http://evil/v1/items/1", 400),
        ("v1/items/1", 400),
        ("/v1/items/%2fadmin", 400),
    ):
        headers = {"X-Rewrite-URL": value, **proxy.auth()}
        async with proxy.session.get(url, headers=headers) as resp:
            assert resp.status == status, value
    assert len(proxy.upstream.requests) == before


def test_the_opt_out_travels_from_the_protected_service_to_the_policy_document() -> None:
    def service(overrides: dict[str, str] | None) -> ServiceConfig:
        spec: dict[str, Any] = {"backend": {"service": "api", "port": 8080}, "issuers": ["ci"]}
        if overrides is not None:
            spec["overrides"] = overrides
        resource = ProtectedService.model_validate(
            {"metadata": {"name": "api", "namespace": "payments"}, "spec": spec}
        )
        return compile_service(resource)

    default = service(None)
    assert not default.authorise_method_overrides
    assert not default.authorise_path_overrides
    assert service({}) == default
    honoured = service({"method": "Authorize"})
    assert honoured.authorise_method_overrides
    assert not honoured.authorise_path_overrides
    assert service({"path": "Authorize"}).authorise_path_overrides
    with pytest.raises(ValueError, match="Reject"):
        service({"method": "Allow"})
    from nhigate.policy import make_document

    for config in (default, honoured, service({"method": "Authorize", "path": "Authorize"})):
        document = make_document(config, (), (), ())
        assert decode_document(encode_document(document)).service == config
    # Documents without overrides keep the version they had before the field existed.
    assert "authorizeOverrides" not in encode_document(make_document(default, (), (), ())).decode()


def test_the_lists_cover_what_the_issue_named() -> None:
    assert {"x-http-method-override", "x-method-override", "x-http-method"} <= (
        METHOD_OVERRIDE_HEADERS
    )
    assert {"x-original-url", "x-rewrite-url"} <= PATH_OVERRIDE_HEADERS
    assert "_method" in METHOD_OVERRIDE_PARAMETERS
