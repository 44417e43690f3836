"""Bodies as both HTTP/1.1 front ends (`app.py` on aiohttp, `http1.py` native) carry them.

A request body with a Content-Length up to `BUFFERED_BODY_LIMIT` is read whole (so a stale
pooled upstream connection can be retried safely) and checked for a form-body method override
at once; a larger or chunked one is streamed through `limited`, which stops it at the
configured maximum and scans a form body on the way. `send_upstream` sends the authorised
request with its body and maps every way that can fail to the denial it is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from nhigate.policy import Reason
from nhigate.proxy.forward import (
    IDEMPOTENT_METHODS,
    RequestBody,
    UnsafeHeadError,
    UpstreamPool,
    UpstreamResponse,
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


async def send_upstream(
    pool: UpstreamPool,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: RequestBody,
    *,
    max_body: int,
    body_errors: tuple[type[Exception], ...] = (ConnectionError,),
) -> tuple[UpstreamResponse, float]:
    """Send the authorised request; (the upstream's response head, seconds it took).

    A head a proxy-made header would break is never sent (500 `internal_error`); the
    upstream's timeout and failures are 504/502; a streamed body over `max_body` is 413, one
    naming a method override mid-stream 400 `override_rejected`, and one the caller broke off
    (`body_errors`: what the front end's body reader raises) 400 `request_rejected`."""
    try:
        head = serialise_head(method, target, headers)
    except UnsafeHeadError as exc:  # a proxy-made header broke framing: never send it
        raise DenyError(Reason.INTERNAL_ERROR, f"unsafe upstream request head: {exc}") from None
    sent = time.perf_counter()
    try:
        upstream = await pool.request(
            head, body, is_head=method == "HEAD", idempotent=method in IDEMPOTENT_METHODS
        )
    except UpstreamTimeoutError as exc:
        raise DenyError(Reason.UPSTREAM_TIMEOUT, str(exc)) from None
    except UpstreamUnavailableError as exc:
        raise DenyError(Reason.UPSTREAM_UNAVAILABLE, str(exc)) from None
    except BodyTooLargeError:
        raise DenyError(Reason.BODY_TOO_LARGE, f"body over {max_body} bytes") from None
    except BodyOverrideError as exc:  # found mid-stream: the upstream got no complete request
        raise DenyError(Reason.OVERRIDE_REJECTED, f"method override: {exc.where}") from None
    except body_errors as exc:
        raise DenyError(
            Reason.REQUEST_REJECTED, f"reading the request body failed: {exc}"
        ) from None
    return upstream, time.perf_counter() - sent
