"""Bodies as both HTTP/1.1 front ends (`app.py` on aiohttp, `http1.py` native) carry them.

A request body with a Content-Length up to `BUFFERED_BODY_LIMIT` is read whole (so a stale
pooled upstream connection can be retried safely) and checked for a form-body method override
at once; a larger or chunked one is streamed through `limited`, which stops it at the
configured maximum and scans a form body on the way. `upstream_denial` maps every way sending
the request upstream can fail to the denial it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from nhigate.policy import Reason
from nhigate.proxy.forward import (
    UnsafeHeadError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    serialise_head,
)
from nhigate.proxy.overrides import BodyOverrideError, FormOverrideScanner, check_form_body
from nhigate.proxy.pipeline import DenyError

BUFFERED_BODY_LIMIT = 64 * 1024
"""Request bodies up to this size (with a Content-Length) are read whole, so a stale pooled
upstream connection can be retried safely; larger ones are streamed."""


class BodyTooLargeError(Exception):
    """A streamed request body passed the configured maximum."""


async def limited(
    read: Callable[[], Awaitable[bytes]], limit: int, form: str | None
) -> AsyncIterator[bytes]:
    """The body `read` returns chunk by chunk (b"" at its end), streamed; over `limit` bytes
    raises `BodyTooLargeError`; a form body is scanned for a method override on the way."""
    total = 0
    scanner = FormOverrideScanner(form) if form is not None else None
    while True:
        chunk = await read()
        if not chunk:
            if scanner is not None:
                scanner.finish()
            return
        total += len(chunk)
        if total > limit:
            raise BodyTooLargeError
        if scanner is not None:
            scanner.feed(chunk)  # raises before the chunk naming an override is forwarded
        yield chunk


def check_form(body: bytes, form: str) -> None:
    """A buffered form body naming a method override -> 400 `override_rejected`."""
    try:
        check_form_body(body, form)
    except BodyOverrideError as exc:
        raise DenyError(Reason.OVERRIDE_REJECTED, f"method override: {exc.where}") from None


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of a response head as the upstream client parsed it; None when
    absent or not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """The upstream request head; one a proxy-made header would break is never sent (500)."""
    try:
        return serialise_head(method, target, headers)
    except UnsafeHeadError as exc:
        raise DenyError(Reason.INTERNAL_ERROR, f"unsafe upstream request head: {exc}") from None


UPSTREAM_FAILURES: tuple[type[Exception], ...] = (
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    BodyTooLargeError,
    BodyOverrideError,
    ConnectionError,
)
"""What sending a request upstream can raise; `upstream_denial` says which denial each is. A
front end whose body reader raises its own error type adds it (it maps like ConnectionError)."""


def upstream_denial(exc: Exception, max_body: int) -> DenyError:
    """The denial for a failed upstream exchange (`UPSTREAM_FAILURES`, checked in that order):
    504/502 for the upstream's timeout and failures, 413 for a streamed body over `max_body`,
    400 `override_rejected` for an override found mid-stream (the upstream got no complete
    request), 400 `request_rejected` for a body the caller broke off."""
    if isinstance(exc, UpstreamTimeoutError):
        return DenyError(Reason.UPSTREAM_TIMEOUT, str(exc))
    if isinstance(exc, UpstreamUnavailableError):
        return DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc))
    if isinstance(exc, BodyTooLargeError):
        return DenyError(Reason.BODY_TOO_LARGE, f"body over {max_body} bytes")
    if isinstance(exc, BodyOverrideError):
        return DenyError(Reason.OVERRIDE_REJECTED, f"method override: {exc.where}")
    return DenyError(Reason.REQUEST_REJECTED, f"reading the request body failed: {exc}")
