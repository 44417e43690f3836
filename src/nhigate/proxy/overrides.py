"""Method and path overrides: headers and parameters a backend may route on instead of the
request line (docs/security.md invariant 7; the list and where each is honoured there).

A grant authorises a method and a path. A backend that honours `X-HTTP-Method-Override:
DELETE` (Express `method-override`, ASP.NET Core `UseHttpMethodOverride`, Symfony, Laravel,
Grails, gorilla/handlers, ...) or `X-Original-URL: /admin` (IIS URL Rewrite, Symfony < 4.1.3,
Zend/Laminas) runs what no grant allows. By default the proxy refuses every request that
carries one (400 `override_rejected`); a ProtectedService may declare that its backend honours
method or path overrides, and then the override is authorised *as well as* the request line
(both must be granted: the proxy cannot know which of the two the backend will act on).

Names are matched case-insensitively with `_` read as `-` (CGI, WSGI, PHP and Rack turn both
`X-HTTP-Method-Override` and `X_HTTP_Method_Override` into `HTTP_X_HTTP_METHOD_OVERRIDE`).
Parameter names are matched after percent-decoding, lower-cased, with PHP's own mangling
(`.`, space and `[` become `_`, `_method[]` is `_method`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

METHOD_OVERRIDE_HEADERS: frozenset[str] = frozenset(
    {
        "x-http-method-override",  # Express, ASP.NET Core, Symfony, Laravel, Grails, gorilla
        "x-http-method",  # OData / Microsoft REST, Symfony-era PHP clients
        "x-method-override",  # Express examples, Apigee and other API gateways
        "x-original-method",  # nginx auth_request convention, forwarded to auth backends
        "x-forwarded-method",  # Traefik/APISIX forward-auth: the method an auth backend decides on
    }
)
"""Headers some backends take the request's method from (lower-case, `-` form)."""

PATH_OVERRIDE_HEADERS: frozenset[str] = frozenset(
    {
        "x-original-url",  # IIS URL Rewrite; Symfony < 4.1.3, Zend/Laminas (CVE-2018-14773)
        "x-rewrite-url",  # ISAPI_Rewrite; Symfony < 4.1.3, Yii 1, Zend (CVE-2018-14773)
        "x-original-uri",  # nginx auth_request convention
        "x-original-path",
        "x-original-request-url",
        "x-forwarded-uri",  # Traefik/APISIX forward-auth
        "x-forwarded-url",
        "x-forwarded-path",
        "x-override-url",
        "x-envoy-original-path",  # Envoy, after a prefix rewrite
    }
)
"""Headers some backends take the request's path from (lower-case, `-` form)."""

METHOD_OVERRIDE_PARAMETERS: frozenset[str] = frozenset(
    {
        "_method",  # Rails/Rack, Laravel, Symfony, Spring HiddenHttpMethodFilter, Hono, wai-extra
        "_httpmethod",  # Salesforce REST (`?_HttpMethod=PATCH` on a POST)
        "_method_override",  # early wai-extra
        "x-http-method-override",
        "x_http_method_override",
    }
)
"""Query (and form body) parameters some backends take the request's method from."""

_OVERRIDE_HEADERS = METHOD_OVERRIDE_HEADERS | PATH_OVERRIDE_HEADERS

_PARAM_MANGLING = str.maketrans({".": "_", " ": "_", "[": "_"})


def canonical_header(name: str) -> str:
    """`X_HTTP_Method_Override` -> `x-http-method-override`."""
    return name.lower().replace("_", "-")


def is_override_parameter(raw_key: str) -> bool:
    """True when a query or form key names a method override, however it is spelled."""
    key = unquote_plus(raw_key).lower()
    base = key.split("[", 1)[0]  # PHP: `_method[]`, `_method[x]` fill `$_GET['_method']`
    return (
        key in METHOD_OVERRIDE_PARAMETERS
        or base in METHOD_OVERRIDE_PARAMETERS
        or key.translate(_PARAM_MANGLING) in METHOD_OVERRIDE_PARAMETERS
        or base.translate(_PARAM_MANGLING) in METHOD_OVERRIDE_PARAMETERS
    )


@dataclass(slots=True)
class Overrides:
    """The overrides one request carries: `(where, value)` pairs."""

    methods: list[tuple[str, str]] = field(default_factory=list)
    paths: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.methods or self.paths)

    def describe(self) -> str:
        """For the audit detail: where the overrides were, never more than 200 characters."""
        names = [where for where, _ in self.methods + self.paths]
        return ", ".join(names)[:200]


def find_overrides(headers: Iterable[tuple[str, str]], query: str) -> Overrides:
    """Every method or path override among the request's headers and query string."""
    found = Overrides()
    for name, value in headers:
        canonical = name.lower().replace("_", "-")  # canonical_header(), inlined: every request
        if canonical in _OVERRIDE_HEADERS:
            if canonical in METHOD_OVERRIDE_HEADERS:
                found.methods.append((f"header {name}", value))
            else:
                found.paths.append((f"header {name}", value))
    if query and ("%" in query or "method" in query.lower()):
        for part in re.split(r"[&;]", query.lstrip("?")):
            key, _, value = part.partition("=")
            if key and is_override_parameter(key):
                found.methods.append((f"query parameter {key[:64]}", unquote_plus(value)))
    return found


FORM_URLENCODED = "application/x-www-form-urlencoded"
MULTIPART_FORM = "multipart/form-data"

_MAX_ENCODED_KEY = 3 * len("x-http-method-override")
"""Longest percent-encoded spelling of an override key: a longer key cannot decode to one."""

_MULTIPART_NAME = re.compile(rb"""name(\*?)\s*=\s*"?([^"\r\n;]{0,120})""", re.IGNORECASE)
"""A `name=` / `name*=` parameter anywhere in a multipart body (part headers or not)."""
_MULTIPART_WINDOW = 256
"""Bytes carried over between streamed multipart chunks, so a part header split across two
chunks is still seen."""


class BodyOverrideError(Exception):
    """A form body names a method override (`_method=DELETE`)."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


def form_kind(content_type: str) -> str | None:
    """`urlencoded`, `multipart` or None for a request's Content-Type."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == FORM_URLENCODED:
        return "urlencoded"
    if media == MULTIPART_FORM:
        return "multipart"
    return None


class FormOverrideScanner:
    """Looks for a method-override field in a form body, chunk by chunk.

    Form bodies are where Rails, Laravel, Symfony, Slim, Spring and gorilla read `_method`.
    The proxy does not parse bodies it forwards; this scanner is the narrow exception: it
    reads only field names (urlencoded keys, multipart `name=` parameters) and raises
    `BodyOverrideError` before the chunk that holds one is forwarded, so the upstream never
    receives a complete request that carries it. Multipart matching is deliberately loose
    (any `name=` spelling in the body, part headers or not): a file that contains the text
    `name="_method"` is refused too (fail closed).
    """

    __slots__ = ("_carry", "_key", "_kind")

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._carry = b""
        self._key: bytes | None = b""
        """urlencoded: the current field's key so far; None while inside its value."""

    def feed(self, chunk: bytes) -> None:
        """Raise `BodyOverrideError` if the body so far names a method override."""
        if self._kind == "urlencoded":
            self._feed_urlencoded(chunk)
        else:
            self._feed_multipart(chunk)

    def _feed_urlencoded(self, chunk: bytes) -> None:
        # `;` separated fields too (older parsers): treating it as `&` only checks more keys.
        for i, piece in enumerate(chunk.replace(b";", b"&").split(b"&")):
            if i:
                self._end_field()
            if self._key is None:
                continue  # the rest of a value
            key, eq, _ = piece.partition(b"=")
            if len(self._key) <= _MAX_ENCODED_KEY:  # a longer key cannot decode to an override
                self._key += key[: _MAX_ENCODED_KEY + 1]
            if eq:
                self._check_key(self._key)
                self._key = None

    def _end_field(self) -> None:
        if self._key:
            self._check_key(self._key)  # a key with no `=`: still a parameter to some parsers
        self._key = b""

    @staticmethod
    def _check_key(key: bytes) -> None:
        if key and len(key) <= _MAX_ENCODED_KEY:
            text = key.decode("latin-1")
            if is_override_parameter(text):
                raise BodyOverrideError(f"form field {text[:64]}")

    def _feed_multipart(self, chunk: bytes) -> None:
        data = self._carry + chunk
        for match in _MULTIPART_NAME.finditer(data):
            name = match.group(2).decode("latin-1").strip()
            if match.group(1):  # RFC 2231 `name*=utf-8'lang'%5Fmethod`
                name = name.rsplit("'", 1)[-1]
            if name and is_override_parameter(name):
                raise BodyOverrideError(f"multipart field {name[:64]}")
        self._carry = data[-_MULTIPART_WINDOW:]

    def finish(self) -> None:
        """The body ended: check what is left (a urlencoded key with no `=`)."""
        if self._kind == "urlencoded":
            self._end_field()


def check_form_body(body: bytes, kind: str) -> None:
    """Raise `BodyOverrideError` if a whole (buffered) form body names a method override."""
    scanner = FormOverrideScanner(kind)
    scanner.feed(body)
    scanner.finish()
