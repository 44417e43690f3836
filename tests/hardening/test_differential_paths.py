"""Differential path fuzzing: the path the policy authorised is the path the upstream received.

Hypothesis builds request targets from granted and ungranted routes mixed with dot-segments,
encoded dots and slashes, double encoding, backslashes, `;` parameters, NUL, raw and overlong
UTF-8, case changes, queries, fragments and very long paths; each one goes over a raw socket
(no client-side normalisation) to a real proxy in front of a raw recording upstream.

For every example:
- if the upstream received a request, its path is canonical, `decide()` allows it for the
  caller's identity, it is outside every ungranted route, and it is the path the proxy's
  audit record (joined by X-Request-Id) says it authorised;
- otherwise the caller got a 4xx deny;
- exactly one audit record was written; the bytes the upstream received re-parse strictly
  into exactly the requests it recorded; and the proxy still serves a plain request.

The same proxy is then fuzzed with headers and query parameters that backends route on
instead of the request line (method and path overrides, in every spelling a CGI/WSGI/PHP
backend folds into the same name, mixed with look-alikes): a request carrying one is refused
with `override_rejected` and never reaches the upstream; one that reaches it carries no
override, and its method and path are the request line's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
from harness import (
    HTTP1_SERVERS,
    ISSUER_NAME,
    SUBJECT,
    ProxyThread,
    make_signing_key,
    raw_exchange,
    token_grant,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nhigate.policy import Facts, Identity, IdentityKind, decide, normalise_path
from nhigate.proxy.overrides import (
    METHOD_OVERRIDE_HEADERS,
    PATH_OVERRIDE_HEADERS,
    canonical_header,
    is_override_parameter,
)

OUTSIDER = "outsider-agent"  # a valid token with no grant at all

GRANTS = (
    token_grant("read", SUBJECT, ("/v1/items/**",), ("GET", "HEAD")),
    token_grant("write", SUBJECT, ("/v1/items/*",), ("POST",)),
    token_grant("status", SUBJECT, ("/status",), ("GET",)),
)
GRANTED_BASES = (("v1", "items"), ("v1", "items", "42"), ("status",))
UNGRANTED_BASES = (("admin",), ("v1", "admin"), ("v1", "items-private"), ("V1", "items"))
UNGRANTED_PREFIXES = ("/admin", "/v1/admin", "/v1/items-private", "/V1/")

ATOMS = (
    "..",
    ".",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2E.",
    "%252e",
    "%252e%252e",
    "%25",
    "",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    "..\\",
    ";",
    "..;",
    ";x=..",
    "%3B",
    "%00",
    "\x00",
    "%C0%AE",
    "%c0%ae%c0%ae",
    "%E0%80%AE",
    "%C0%AF",
    "%EF%BC%8F",
    "é",
    "\u2215",
    "%E2%80%AE",
    "\uff41\uff44\uff4d\uff49\uff4e",  # fullwidth "admin"
    "admin",
    "ADMIN",
    "Items",
    "ITEMS",
    "items",
    "v1",
    "V1",
    "secret",
    "%41dmin",
    "%61dmin",
    "~",
    "*",
    "%2A",
    "%",
    "%zz",
    "a b",
    "[x]",
    "@",
)

segment = st.one_of(
    st.sampled_from(ATOMS),
    st.text(alphabet="abcAZ09-._~%2eE/\\;", min_size=1, max_size=6),
)


benign = st.sampled_from(["1", "42", "abc", "x-y", "a.b", "~u", "%41", "%7E", "."])


@st.composite
def request_targets(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(GRANTED_BASES * 3 + UNGRANTED_BASES))
    prefix = list(draw(st.lists(segment, max_size=3)))
    suffix = list(draw(st.lists(st.one_of(benign, benign, segment), max_size=5)))
    mixed = [*prefix, *base, *suffix] if draw(st.integers(0, 2)) == 2 else [*base, *suffix]
    separator = draw(st.sampled_from(["/", "/", "/", "//"]))
    path = "/" + separator.join(mixed)
    if draw(st.integers(0, 30)) == 30:
        path += "/" + "a" * draw(st.sampled_from([4000, 8300, 20000]))
    if draw(st.integers(0, 7)) == 7:
        path = path.upper()
    query = draw(
        st.sampled_from(["", "", "?q=1", "?next=/admin", "?p=../../admin", "?%2e%2e=%2f", "?a?b"])
    )
    fragment = draw(st.sampled_from(["", "", "", "", "", "", "#frag", "#/../admin"]))
    return path + query + fragment


def _identity(subject: str) -> Identity:
    return Identity(kind=IdentityKind.JWT, issuer=ISSUER_NAME, subject=subject)


@pytest.fixture(scope="module", params=HTTP1_SERVERS)
def proxy(request: pytest.FixtureRequest) -> Iterator[ProxyThread]:
    key = make_signing_key("ES256", kid="diff")
    with ProxyThread(key, GRANTS, http1_server=request.param) as running:
        yield running


TRIED = {"examples": 0, "reached": 0, "denied": 0}
REASONS: Counter[str] = Counter()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    target=request_targets(),
    method=st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "DELETE"]),
    subject=st.sampled_from([SUBJECT, SUBJECT, SUBJECT, OUTSIDER]),
)
def test_the_authorised_path_is_the_path_the_upstream_received(
    proxy: ProxyThread, target: str, method: str, subject: str
) -> None:
    TRIED["examples"] += 1
    audit_before = len(proxy.audit_records())
    upstream_before = len(proxy.upstream.messages)
    body_headers = "Content-Length: 0\r\n" if method == "POST" else ""
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: proxy\r\n"
        f"Authorization: Bearer {proxy.token(subject)}\r\n{body_headers}Connection: close\r\n\r\n"
    ).encode("utf-8", "surrogateescape")
    responses, raw, closed = raw_exchange(
        proxy.port, request, timeout=5.0, head_only=method == "HEAD"
    )
    assert responses, f"no response for {target!r} (closed={closed}, got {raw[:200]!r})"
    status = responses[0].status

    records = _wait_audit(proxy, audit_before + 1)
    assert len(records) == audit_before + 1, f"{target!r}: audit records {records[audit_before:]}"
    record = records[-1]
    REASONS[str(record["reason"])] += 1
    reached = proxy.upstream.messages[upstream_before:]
    assert len(reached) <= 1
    if not reached:
        TRIED["denied"] += 1
        assert 400 <= status < 500, (target, status)
        assert record["decision"] == "deny", record
        return

    TRIED["reached"] += 1
    seen = reached[0]
    path = seen.path
    assert normalise_path(path) == path, f"{target!r} forwarded a non-canonical {path!r}"
    decision = decide(
        proxy.holder.current,  # type: ignore[arg-type]
        Facts(identity=_identity(subject), method=seen.method, path=path, now=time.time()),
    )
    assert decision.allowed, f"{target!r} reached {seen.method} {path!r}: {decision.reason}"
    assert not any(path == p or path.startswith(p + "/") for p in UNGRANTED_PREFIXES), path
    assert subject == SUBJECT
    assert seen.method == method
    # The audit record of this request names the very path the upstream received.
    assert record["decision"] == "allow", record
    assert seen.header("X-Request-Id") == [record["request_id"]]
    assert record["path"] == path
    assert "#" not in seen.target
    assert seen.header("Authorization") == []
    assert status == 200


# -- headers: nothing the proxy forwards may change the method or path a backend routes on --

OVERRIDE_HEADER_NAMES = sorted(METHOD_OVERRIDE_HEADERS | PATH_OVERRIDE_HEADERS)
BENIGN_HEADERS = ("X-Custom", "Accept", "X-Method", "X-Path", "X-Forwarded-Host", "Method")
OVERRIDE_VALUES = ("DELETE", "put", "/admin", "/v1/admin", "/v1/items/../../admin", "GET", "")


@st.composite
def header_names(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(OVERRIDE_HEADER_NAMES + list(BENIGN_HEADERS)))
    spelling = draw(st.sampled_from(["as is", "upper", "title", "underscores", "mixed"]))
    if spelling == "upper":
        return name.upper()
    if spelling == "title":
        return name.title()
    if spelling == "underscores":
        return name.replace("-", "_")
    if spelling == "mixed":
        return "".join(c.upper() if i % 2 else c for i, c in enumerate(name)).replace("-", "_", 1)
    return name


override_queries = st.sampled_from(
    [
        "",
        "",
        "",
        "?q=1",
        "?_method=DELETE",
        "?%5Fmethod=PUT",
        "?.method=DELETE",
        "?_HttpMethod=x",
        "?a=1;_method=PUT",
        "?_method[]=DELETE",
        "?method=GET",
        "?q=_method",
    ]
)


HEADER_TRIED = {"examples": 0, "reached": 0, "refused": 0}


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "GET", "POST", "HEAD"]),
    base=st.sampled_from(["/v1/items/1", "/v1/items/42", "/status"]),
    query=override_queries,
    extra=st.lists(st.tuples(header_names(), st.sampled_from(OVERRIDE_VALUES)), max_size=3),
)
def test_no_forwarded_header_or_parameter_changes_the_method_or_path_a_backend_routes_on(
    proxy: ProxyThread, method: str, base: str, query: str, extra: list[tuple[str, str]]
) -> None:
    HEADER_TRIED["examples"] += 1
    audit_before = len(proxy.audit_records())
    upstream_before = len(proxy.upstream.messages)
    lines = "".join(f"{name}: {value}\r\n" for name, value in extra)
    body_headers = "Content-Length: 0\r\n" if method == "POST" else ""
    request = (
        f"{method} {base}{query} HTTP/1.1\r\nHost: proxy\r\n{lines}"
        f"Authorization: Bearer {proxy.token(SUBJECT)}\r\n{body_headers}Connection: close\r\n\r\n"
    ).encode()
    responses, raw, closed = raw_exchange(
        proxy.port, request, timeout=5.0, head_only=method == "HEAD"
    )
    assert responses, f"no response (closed={closed}, got {raw[:200]!r})"
    status = responses[0].status
    records = _wait_audit(proxy, audit_before + 1)
    assert len(records) == audit_before + 1
    carried = [name for name, _ in extra if canonical_header(name) in OVERRIDE_HEADER_NAMES]
    fields = query.lstrip("?").replace(";", "&").split("&") if query else []
    carried += [f for f in fields if is_override_parameter(f.split("=", 1)[0])]
    reached = proxy.upstream.messages[upstream_before:]
    if carried:
        # The default service honours no override: every request carrying one is refused.
        assert not reached, f"{carried} reached the upstream"
        assert status == 400
        assert records[-1]["reason"] == "override_rejected", records[-1]
        HEADER_TRIED["refused"] += 1
        return
    if not reached:
        assert 400 <= status < 500
        return
    HEADER_TRIED["reached"] += 1
    seen = reached[0]
    assert seen.method == method
    assert seen.path == base
    for name, _ in seen.headers:
        assert canonical_header(name) not in OVERRIDE_HEADER_NAMES, name
    for part in seen.target.partition("?")[2].replace(";", "&").split("&"):
        assert not is_override_parameter(part.split("=", 1)[0]), seen.target


def test_the_upstream_bytes_are_exactly_the_recorded_requests_and_the_proxy_is_healthy(
    proxy: ProxyThread,
) -> None:
    # Runs after the hypothesis test in file order (same module-scoped proxy).
    wire = proxy.upstream.reparse()
    assert [(m.method, m.target) for m in wire] == [
        (m.method, m.target) for m in proxy.upstream.messages
    ]
    assert proxy.upstream.parse_errors == []
    assert proxy.healthy()
    assert TRIED["examples"] >= 100, TRIED
    assert TRIED["reached"] > 0, TRIED
    assert TRIED["denied"] > 0, TRIED
    assert HEADER_TRIED["reached"] > 0, HEADER_TRIED
    assert HEADER_TRIED["refused"] > 0, HEADER_TRIED
    print(f"differential paths: {TRIED} {dict(REASONS)}; headers: {HEADER_TRIED}")


def _wait_audit(proxy: ProxyThread, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 3.0
    records = proxy.audit_records()
    while len(records) < count and time.monotonic() < deadline:
        time.sleep(0.005)
        records = proxy.audit_records()
    return records
