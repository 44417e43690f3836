"""Audit the requests aiohttp's HTTP parser refuses before they reach the pipeline.

Smuggling shapes (duplicate `Content-Length`, `Transfer-Encoding` with `Content-Length`,
obs-fold, bare LF, header names with spaces, NUL or raw non-ASCII bytes in the target,
oversized or too many headers) never become a `web.Request`: aiohttp answers 400 itself and
closes the connection, so the pipeline's audit line is never written. docs/security.md invariant 6
says every decision is audited, and a refused smuggling attempt is exactly the decision an
operator wants to see. aiohttp's public hook on that path is the access logger, which it
calls for every response, refused ones included; `rejected_request_audit(app)` returns the
runner options that install one which writes a deny record for parser refusals only
(requests the pipeline handled already wrote theirs).

`app.ProxyRunner` recognises that logger class (its `audit_refusal`) and does the same
without an access logger: it gives parser refusals their own request class whose
response-prepare hook writes the record, so accepted requests pay nothing for it (an access
logger costs two clock reads and two Python calls on every request).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from nhigate.policy import Reason
from nhigate.proxy.aiohttp_seam import PARSER_ERROR_MESSAGE, refused_by_parser
from nhigate.proxy.audit import AuditEvent
from nhigate.proxy.state import STATE, ProxyState

log = logging.getLogger(__name__)


def _first_line(response: web.StreamResponse) -> str:
    # The parser's message echoes the offending header line, which may hold a credential:
    # keep only its first line ("Invalid header token:", "Duplicate Content-Length", ...).
    text = getattr(response, "text", None)
    if not isinstance(text, str) or not text:
        return "malformed HTTP request"
    first = text.split("\n", 1)[0].split(": b'", 1)[0].split(' b"', 1)[0]
    return first.strip().rstrip(":")[:80] or "malformed HTTP request"


def audit_refusal(
    state: ProxyState, request: Any, response: web.StreamResponse, seconds: float
) -> None:
    """Write the deny record (and metrics) for one request the HTTP parser refused."""
    policy = state.holder.current
    reason = Reason.REQUEST_REJECTED
    detail = f"refused by the HTTP parser: {_first_line(response)}"
    state.audit.write(
        AuditEvent(
            time=state.clock(),
            request_id=secrets.token_hex(8),
            decision="deny",
            reason=reason.value,
            method="-",
            path="",
            upstream=state.settings.upstream.url,
            status=response.status,
            duration_ms=seconds * 1000.0,
            policy_version=policy.version if policy is not None else None,
            detail=detail,
            peer=request.remote,
        )
    )
    state.metrics.observe_request("deny", reason.value, None, seconds)


def _logger_class(state: ProxyState) -> type[AbstractAccessLogger]:
    class RejectedRequestAudit(AbstractAccessLogger):
        """Writes one deny record for each request the HTTP parser refused."""

        @staticmethod
        def audit_refusal(request: Any, response: web.StreamResponse, seconds: float) -> None:
            """The record for one refused request (`ProxyRunner` calls this directly)."""
            audit_refusal(state, request, response, seconds)

        def log(self, request: Any, response: web.StreamResponse, time: float) -> None:
            if not refused_by_parser(request):
                return  # the pipeline handled (and audited) this request
            audit_refusal(state, request, response, time)

    return RejectedRequestAudit


def rejected_request_audit(app: web.Application) -> dict[str, Any]:
    """Keyword arguments for `web.AppRunner(app, ...)` that audit parser-refused requests.

    Use instead of `access_log=None`: `web.AppRunner(app, **rejected_request_audit(app))`.
    """
    if PARSER_ERROR_MESSAGE is None:  # pragma: no cover - guards an aiohttp upgrade
        log.error("aiohttp has no parser-error placeholder: parser refusals are not audited")
        return {"access_log": None}
    return {"access_log_class": _logger_class(app[STATE]), "access_log": log}
