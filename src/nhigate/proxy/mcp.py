"""MCP endpoints at the proxy: strict JSON-RPC parsing, per-message decisions, filtered lists.

On a path the ProtectedService declares as an MCP endpoint (docs/mcp.md):

- POST bodies are read whole (bounded by the proxy's max body size), decoded as
  strict UTF-8 and parsed as strict JSON (duplicate keys, NaN/Infinity, a BOM or
  anything after the value refused), then every JSON-RPC message is decided:
  `tools/call` on `params.name`, `resources/read` (and subscribe/unsubscribe) on
  `params.uri`, `prompts/get` on `params.name`, `completion/complete` on its
  `ref`; the session-level methods (`initialize`, `ping`, `notifications/*`, the
  `*/list` methods, responses to server requests) need any MCP grant on the
  endpoint; any other method is denied. A batch is allowed only when every
  message is. The bytes forwarded are the bytes that were parsed.
- GET (a legacy standalone SSE stream) and DELETE (legacy session end) need any
  MCP grant on the endpoint and carry no body.
- `*/list` results are filtered to what the caller may use, in `application/json`
  bodies and in `text/event-stream` responses event by event (slow streams are
  forwarded as each event completes).
- `Mcp-Session-Id`s the backend hands out are bound to the identity that received
  them (per replica); another identity presenting one is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson
from aiohttp import HttpVersion11, web

from nhigate.policy.mcp import McpKind, McpScope
from nhigate.policy.model import Decision, Identity, Reason
from nhigate.policy.strict_json import STRICT_DECODER, StrictJsonError
from nhigate.proxy.headers import filter_response_headers

log = logging.getLogger(__name__)

MAX_BATCH: Final = 64
"""Most JSON-RPC messages one request may carry (a batch, protocol 2025-03-26)."""
MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
"""Largest `application/json` response (or SSE event) the list filter holds in memory."""
MAX_SESSIONS: Final = 65536
"""Session bindings remembered per replica (least recently used forgotten first)."""

FORBIDDEN_CODE: Final = -32001
"""JSON-RPC error code of a denial (implementation-defined server error range)."""
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
HEADER_MISMATCH: Final = -32020
"""MCP's HeaderMismatch: `Mcp-Method`/`Mcp-Name` disagree with the body."""

SESSION_HEADER: Final = "Mcp-Session-Id"
METHOD_HEADER: Final = "Mcp-Method"
NAME_HEADER: Final = "Mcp-Name"

_SESSION_METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "logging/setLevel",
        "subscriptions/listen",
        "server/discover",
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/cancel",
    }
)
"""Methods any MCP grant on the endpoint allows (they name no tool, resource or prompt)."""


class ListKind(StrEnum):
    """Which `*/list` result a response carries, and the member holding its items."""

    TOOLS = "tools"
    RESOURCES = "resources"
    RESOURCE_TEMPLATES = "resourceTemplates"
    PROMPTS = "prompts"


_LIST_METHODS: Final = {
    "tools/list": ListKind.TOOLS,
    "resources/list": ListKind.RESOURCES,
    "resources/templates/list": ListKind.RESOURCE_TEMPLATES,
    "prompts/list": ListKind.PROMPTS,
}
_ITEM_KEY: Final = {
    ListKind.TOOLS: ("name", McpKind.TOOL),
    ListKind.RESOURCES: ("uri", McpKind.RESOURCE),
    ListKind.RESOURCE_TEMPLATES: ("uriTemplate", McpKind.RESOURCE),
    ListKind.PROMPTS: ("name", McpKind.PROMPT),
}
_NAMED_METHODS: Final = {
    "tools/call": (McpKind.TOOL, "name"),
    "prompts/get": (McpKind.PROMPT, "name"),
    "resources/read": (McpKind.RESOURCE, "uri"),
    "resources/subscribe": (McpKind.RESOURCE, "uri"),
    "resources/unsubscribe": (McpKind.RESOURCE, "uri"),
}


class McpDeniedError(Exception):
    """The MCP request is refused: `reason`, the JSON-RPC error `body`, the decision behind it."""

    def __init__(
        self,
        reason: Reason,
        detail: str,
        body: bytes,
        decision: Decision | None = None,
        audit: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail
        self.body = body
        self.decision = decision
        self.audit = audit


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message of a request body, as far as authorisation cares."""

    method: str | None
    """None for a response (to a server request)."""
    has_id: bool
    id: object
    kind: McpKind | None = None
    """What `name` is, for the messages that name one; None for session-level ones."""
    name: str = ""
    list_kind: ListKind | None = None
    known: bool = True
    """False for a method the proxy cannot authorise (denied)."""


# --- strict JSON ------------------------------------------------------------------------------


_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def strict_json(data: bytes) -> Any:
    """Parse `data` as strict JSON: UTF-8 without BOM, no duplicate object keys, no
    NaN/Infinity, no lone surrogate escapes, nothing but whitespace after the value.
    Raises ValueError with a short reason."""
    try:
        text = data.decode("utf-8")  # strict: invalid UTF-8 and encoded surrogates refused
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None
    if text.startswith("\ufeff"):
        raise ValueError("byte order mark")
    try:
        value = STRICT_DECODER.decode(text)
    except StrictJsonError as exc:
        raise ValueError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None:
        try:
            orjson.dumps(value)  # refuses a lone surrogate (a `\ud800` escape alone)
        except TypeError:
            raise ValueError("lone surrogate escape") from None
    return value


# --- request messages -------------------------------------------------------------------------


def _error_object(
    request_id: object, code: int, message: str, data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": code, "message": message, "data": data},
    }


def error_body(
    messages: list[Message] | None, batch: bool, code: int, message: str, data: dict[str, Any]
) -> bytes:
    """The JSON-RPC error answer: one error per request in the body (with its `id`), or
    one with `id: null` when there is none (a parse error, notifications only)."""
    ids = [m.id for m in messages or () if m.has_id and m.method is not None]
    if batch and ids:
        return orjson.dumps([_error_object(i, code, message, data) for i in ids])
    return orjson.dumps(_error_object(ids[0] if ids else None, code, message, data))


class _InvalidMessageError(Exception):
    def __init__(self, message: str, request_id: object = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _valid_id(value: object) -> bool:
    return (isinstance(value, str) and len(value) <= 1024) or (
        type(value) is int and -(2**63) <= value < 2**63
    )


def _message(obj: object) -> Message:
    if not isinstance(obj, dict):
        raise _InvalidMessageError("a JSON-RPC message must be an object")
    request_id = obj.get("id")
    if obj.get("jsonrpc") != "2.0":
        raise _InvalidMessageError(
            '"jsonrpc" must be "2.0"', request_id if _valid_id(request_id) else None
        )
    has_id = "id" in obj
    if has_id and not _valid_id(request_id):
        raise _InvalidMessageError('"id" must be a string or an integer')
    method = obj.get("method")
    if "method" not in obj:
        # A response to a server-initiated request (legacy protocol versions).
        if not has_id or ("result" in obj) == ("error" in obj):
            raise _InvalidMessageError("a message without a method must be a response", request_id)
        return Message(method=None, has_id=True, id=request_id)
    if not isinstance(method, str):
        raise _InvalidMessageError('"method" must be a string', request_id)
    params = obj.get("params")
    if params is not None and not isinstance(params, dict | list):
        raise _InvalidMessageError('"params" must be an object or an array', request_id)
    named = _NAMED_METHODS.get(method)
    if named is not None:
        kind, member = named
        name = params.get(member) if isinstance(params, dict) else None
        if not isinstance(name, str):
            raise _InvalidMessageError(f'{method} needs a string "params.{member}"', request_id)
        return Message(method, has_id, request_id, kind, name)
    if method == "completion/complete":
        ref = params.get("ref") if isinstance(params, dict) else None
        ref_type = ref.get("type") if isinstance(ref, dict) else None
        if ref_type == "ref/prompt" and isinstance(ref, dict) and isinstance(ref.get("name"), str):
            return Message(method, has_id, request_id, McpKind.PROMPT, ref["name"])
        if ref_type == "ref/resource" and isinstance(ref, dict) and isinstance(ref.get("uri"), str):
            return Message(method, has_id, request_id, McpKind.RESOURCE, ref["uri"])
        raise _InvalidMessageError(
            'completion/complete needs a "params.ref" prompt or resource', request_id
        )
    if method in _SESSION_METHODS:
        return Message(method, has_id, request_id, list_kind=_LIST_METHODS.get(method))
    if method.startswith("notifications/") and not has_id:
        return Message(method, has_id, request_id)
    return Message(method, has_id, request_id, known=False)


def parse_messages(body: bytes) -> tuple[list[Message], bool]:
    """The JSON-RPC messages of a request body and whether it was a batch.

    Raises `_InvalidMessageError` (with the JSON-RPC code's meaning in its message) on anything
    that is not strict JSON or not JSON-RPC 2.0.
    """
    try:
        value = strict_json(body)
    except ValueError as exc:
        raise _InvalidMessageError(f"parse error: {exc}") from None
    if isinstance(value, list):
        if not value:
            raise _InvalidMessageError("an empty batch")
        if len(value) > MAX_BATCH:
            raise _InvalidMessageError(f"a batch of more than {MAX_BATCH} messages")
        return [_message(item) for item in value], True
    return [_message(value)], False


def _header_value(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise _InvalidMessageError(f"more than one {name} header")
    return values[0] if values else None


def _decoded_header(value: str) -> str:
    # MCP's sentinel for values that are not plain ASCII: =?base64?...?=
    if value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11:
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _InvalidMessageError(
                f"malformed base64 value in a header: {value[:64]!r}"
            ) from None
    return value


def check_mirrored_headers(request: web.Request, messages: list[Message], batch: bool) -> None:
    """`Mcp-Method`/`Mcp-Name` (protocol 2026-07-28) must agree with the body: a component
    routing on the header must not see a different call than the one authorised."""
    method = _header_value(request, METHOD_HEADER)
    name = _header_value(request, NAME_HEADER)
    if method is None and name is None:
        return
    if batch:
        raise _InvalidMessageError("Mcp-Method/Mcp-Name headers on a batch")
    message = messages[0]
    if method is not None and method != message.method:
        raise _InvalidMessageError("Mcp-Method header does not match the body")
    if name is not None and (message.kind is None or _decoded_header(name) != message.name):
        raise _InvalidMessageError("Mcp-Name header does not match the body")
    if name is None and message.kind is not None and method is not None:
        raise _InvalidMessageError("Mcp-Name header missing")


# --- session binding --------------------------------------------------------------------------

IdentityKey = tuple[str, str, str, tuple[str, ...]]


def identity_key(identity: Identity) -> IdentityKey:
    """Who a session belongs to: kind, issuer, subject and actor chain."""
    return (identity.kind.value, identity.issuer, identity.subject, identity.actors)


@dataclass
class SessionBindings:
    """`Mcp-Session-Id` -> the identity the backend issued it to (bounded, per replica)."""

    max_sessions: int = MAX_SESSIONS
    _owners: OrderedDict[str, IdentityKey] = field(default_factory=OrderedDict)

    def owner(self, session_id: str) -> IdentityKey | None:
        """The identity bound to `session_id`, if this replica saw it issued."""
        owner = self._owners.get(session_id)
        if owner is not None:
            self._owners.move_to_end(session_id)
        return owner

    def bind(self, session_id: str, owner: IdentityKey) -> None:
        """Remember the first owner of a session id (never rebinds)."""
        if session_id in self._owners:
            return
        self._owners[session_id] = owner
        if len(self._owners) > self.max_sessions:
            self._owners.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Drop a binding (the session was deleted)."""
        self._owners.pop(session_id, None)


# --- response filtering -----------------------------------------------------------------------


def _id_key(value: object) -> tuple[str, object] | None:
    if isinstance(value, str):
        return ("s", value)
    if type(value) is int:
        return ("i", value)
    return None


@dataclass
class ListFilter:
    """Filters `*/list` results in responses to what `scope` allows."""

    scope: McpScope
    list_ids: dict[tuple[str, object], ListKind]
    """Request ids of the `*/list` requests in the body (by id)."""
    request_ids: frozenset[tuple[str, object]]
    """Every request id in the body: responses to other ids are filtered by their shape."""
    removed: int = 0

    def _filter_result(self, result: dict[str, Any], kind: ListKind) -> bool:
        items = result.get(kind.value)
        if not isinstance(items, list):
            return False
        key, what = _ITEM_KEY[kind]
        kept = [
            item
            for item in items
            if isinstance(item, dict)
            and isinstance(item.get(key), str)
            and self.scope.allows(what, item[key])
        ]
        if len(kept) == len(items):
            return False
        self.removed += len(items) - len(kept)
        result[kind.value] = kept
        return True

    def filter_message(self, message: object) -> bool:
        """Filter one JSON-RPC message in place; True when something was removed."""
        if not isinstance(message, dict) or "method" in message:
            return False
        result = message.get("result")
        if not isinstance(result, dict):
            return False
        key = _id_key(message.get("id"))
        if key is not None and key in self.request_ids:
            kind = self.list_ids.get(key)
            return kind is not None and self._filter_result(result, kind)
        # A response this request did not ask for (a GET stream, a replay): by its shape.
        changed = False
        for kind in ListKind:
            if kind.value in result:
                changed = self._filter_result(result, kind) or changed
        return changed

    def filter_payload(self, data: bytes) -> bytes | None:
        """The payload with list results filtered, None when unchanged. Raises ValueError
        when it is not strict JSON (the caller drops it: fail closed)."""
        value = strict_json(data)
        if isinstance(value, list):
            changed = False
            for item in value:
                changed = self.filter_message(item) or changed
        else:
            changed = self.filter_message(value)
        return orjson.dumps(value) if changed else None


_BOM: Final = b"\xef\xbb\xbf"


class SseFilter:
    """Incremental `text/event-stream` filter: complete events pass through `transform`.

    Lines end in CRLF, LF or CR (a CR at a chunk's end waits for the next chunk); an
    event ends at an empty line. Events without `data` (comments, keep-alives) and
    events whose data `transform` leaves alone are forwarded byte for byte; a changed
    event is re-written as its non-data lines plus one `data:` line. Events whose data
    is not strict JSON are dropped. Each event is released as soon as it is complete.
    """

    def __init__(self, list_filter: ListFilter, max_event: int = MAX_RESPONSE_BYTES) -> None:
        self._filter = list_filter
        self._max_event = max_event
        self._buffer = bytearray()
        self._event: list[bytes] = []
        self._size = 0
        self._started = False
        self.dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk of the upstream stream; return the bytes ready for the caller."""
        self._buffer += chunk
        if not self._started:
            if len(self._buffer) < 3 and _BOM.startswith(bytes(self._buffer)):
                return b""  # maybe a byte order mark split across chunks
            self._started = True
            if self._buffer.startswith(_BOM):
                # SSE clients skip a leading BOM; parse (and forward) the stream without it so
                # its first field is read exactly as the client reads it.
                del self._buffer[:3]
        return self._drain(final=False)

    def close(self) -> bytes:
        """End of stream: an unterminated trailing event is dispatched as if complete."""
        out = self._drain(final=True)
        if self._buffer:
            self._event.append(bytes(self._buffer) + b"\n")
            self._buffer.clear()
        if self._event:
            out += self._dispatch()
        return out

    def _drain(self, *, final: bool) -> bytes:
        out = bytearray()
        buffer = self._buffer
        start = 0
        length = len(buffer)
        while start < length:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else length)
            if cr >= 0:
                if cr + 1 == length and not final:
                    break  # a CR at the end: maybe CRLF split across chunks
                end = cr + 2 if cr + 1 < length and buffer[cr + 1] == 0x0A else cr + 1
                content_end = cr
            elif lf >= 0:
                end = lf + 1
                content_end = lf
            else:
                break
            line = bytes(buffer[start:end])
            self._size += len(line)
            if self._size > self._max_event:
                raise ValueError(f"an SSE event longer than {self._max_event} bytes")
            self._event.append(line)
            if content_end == start:  # empty line: the event is complete
                out += self._dispatch()
            start = end
        del buffer[:start]
        if len(buffer) + self._size > self._max_event:
            raise ValueError(f"an SSE event longer than {self._max_event} bytes")
        return bytes(out)

    def _dispatch(self) -> bytes:
        lines, self._event, self._size = self._event, [], 0
        data: list[bytes] = []
        others: list[bytes] = []
        for line in lines:
            content = line.rstrip(b"\r\n")
            name, _, value = content.partition(b":")
            if name == b"data" and content:
                data.append(value[1:] if value.startswith(b" ") else value)
            elif content:
                others.append(content)
        payload = b"\n".join(data)
        if not payload.strip():
            return b"".join(lines)  # no message (e.g. an event that only primes Last-Event-ID)
        try:
            changed = self._filter.filter_payload(payload)
        except ValueError as exc:
            self.dropped += 1
            log.warning("dropped an SSE event from the MCP backend: %s", exc)
            return b""
        if changed is None:
            return b"".join(lines)
        return b"".join(line + b"\n" for line in others) + b"data: " + changed + b"\n\n"


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    for name, value in headers:
        if name.lower() == wanted:
            return value.decode("latin-1")
    return None


AuditAllowed = Callable[[int, str | None], None]


@dataclass
class McpResponder:
    """Answers the caller from an MCP backend response: lists filtered, sessions bound."""

    list_filter: ListFilter
    sessions: SessionBindings
    owner: IdentityKey
    filter_json: bool
    """Parse `application/json` responses (only when the request had a `*/list`)."""
    list_request: bool = False
    """The request carried a `*/list` message: its answer is parsed whatever its type."""
    deleting_session: str | None = None

    def bind_session(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Bind a session id the backend hands out to the identity it was handed to."""
        session = _header(headers, b"mcp-session-id")
        if session is not None and 200 <= status < 300:
            self.sessions.bind(session, self.owner)
        if self.deleting_session is not None and 200 <= status < 300:
            self.sessions.forget(self.deleting_session)

    async def respond(
        self,
        request: web.Request,
        upstream: Any,
        audit: AuditAllowed,
        on_broken: Callable[[], None],
    ) -> web.StreamResponse:
        """Stream or buffer the upstream answer through the list filter."""
        status: int = upstream.status
        headers: list[tuple[bytes, bytes]] = upstream.headers
        self.bind_session(status, headers)
        content_type = _content_type(headers)
        out_headers = filter_response_headers(headers)
        detail: str | None = None
        if content_type == b"text/event-stream" and request.method != "HEAD":
            sse = SseFilter(self.list_filter)
            stream = web.StreamResponse(status=status, headers=out_headers)
            try:
                await stream.prepare(request)
                if upstream.body is not None:
                    await stream.write(sse.feed(upstream.body) + sse.close())
                else:
                    async for chunk in upstream.iter_chunks():
                        ready = sse.feed(chunk)
                        if ready:
                            await stream.write(ready)
                    tail = sse.close()
                    if tail:
                        await stream.write(tail)
                await stream.write_eof()
            except ValueError as exc:
                detail = f"MCP stream refused: {exc}"
                on_broken()
            except ConnectionError as exc:
                detail = f"client went away mid-body: {type(exc).__name__}"
            except Exception as exc:  # upstream failures mid-stream
                detail = f"upstream failed mid-body: {exc}"
                on_broken()
            finally:
                upstream.close()
            if sse.dropped:
                detail = (detail + "; " if detail else "") + f"{sse.dropped} SSE events dropped"
            if self.list_filter.removed:
                note = f"{self.list_filter.removed} list items filtered"
                detail = (detail + "; " if detail else "") + note
            audit(status, detail)
            return stream
        # A list answer is filtered whatever its Content-Type says (a lenient client may parse a
        # text/plain body as JSON); only GET/DELETE answers are trusted to label themselves.
        as_json = content_type == b"application/json" or (
            self.list_request and content_type != b"text/event-stream"
        )
        if self.filter_json and as_json and request.method != "HEAD":
            try:
                body = upstream.body
                if body is None:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in upstream.iter_chunks():
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            raise ValueError(f"response over {MAX_RESPONSE_BYTES} bytes")
                        chunks.append(chunk)
                    body = b"".join(chunks)
            finally:
                upstream.close()
            try:
                changed = self.list_filter.filter_payload(body) if body else None
            except ValueError as exc:
                raise McpUpstreamError(f"MCP response is not strict JSON: {exc}") from None
            if changed is not None:
                body = changed
            response = web.Response(status=status, body=body, headers=out_headers)
            count = self.list_filter.removed
            audit(status, f"{count} list items filtered" if count else None)
            return response
        # Nothing to filter (a tools/call result, 202, an error page): stream it unchanged.
        stream = web.StreamResponse(status=status, headers=out_headers)
        length = _header(headers, b"content-length")
        if length is not None and length.isdigit():
            stream.content_length = int(length)
        try:
            await stream.prepare(request)
            if upstream.body is not None:
                if request.method != "HEAD":
                    await stream.write(upstream.body)
            else:
                async for chunk in upstream.iter_chunks():
                    await stream.write(chunk)
            await stream.write_eof()
        except ConnectionError as exc:
            detail = f"client went away mid-body: {type(exc).__name__}"
        except Exception as exc:
            detail = f"upstream failed mid-body: {exc}"
            on_broken()
        finally:
            upstream.close()
        audit(status, detail)
        return stream


class McpUpstreamError(Exception):
    """The MCP backend's answer could not be filtered (denied as `upstream_unavailable`)."""


# --- the request side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class McpAuthorised:
    """An MCP request the proxy may forward: exactly `body`, answered through `responder`."""

    decision: Decision
    body: bytes | None
    responder: McpResponder
    audit: dict[str, Any]


def _audit_record(messages: list[Message], batch: bool) -> dict[str, Any]:
    def one(m: Message) -> dict[str, Any]:
        record: dict[str, Any] = {"method": m.method if m.method is not None else "(response)"}
        if m.kind is not None:
            record[m.kind.value] = m.name[:512]
        return record

    if batch:
        return {"batch": [one(m) for m in messages]}
    return one(messages[0])


def _denied(
    reason: Reason,
    detail: str,
    request_id: str,
    *,
    messages: list[Message] | None = None,
    batch: bool = False,
    code: int = FORBIDDEN_CODE,
    decision: Decision | None = None,
    audit: dict[str, Any] | None = None,
) -> McpDeniedError:
    data = {"reason": reason.value, "request_id": request_id}
    message = "forbidden" if code == FORBIDDEN_CODE else detail
    body = error_body(messages, batch, code, message, data)
    return McpDeniedError(reason, detail, body, decision, audit)


def _json_content_type(value: str | None) -> bool:
    if value is None:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        key, _, val = param.strip().partition("=")
        if not key:
            continue
        if key.strip().lower() != "charset" or val.strip().strip('"').lower() != "utf-8":
            return False
    return True


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes (chunked or not)."""
    chunks: list[bytes] = []
    total = 0
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise OverflowError(total)
        chunks.append(chunk)


class McpGate:
    """Authorises requests to one replica's MCP endpoints (one per process)."""

    def __init__(self, max_body: int, sessions: SessionBindings) -> None:
        self.max_body = max_body
        self.sessions = sessions

    async def authorise(
        self,
        request: web.Request,
        request_id: str,
        scope: McpScope,
        identity: Identity,
        query: str,
        *,
        answers_expect: bool,
    ) -> McpAuthorised:
        """Read, parse and decide the request; raise `McpDeniedError` with the JSON-RPC answer.

        `answers_expect`: send `100 Continue` once authorised (False when aiohttp's router
        already has).
        """
        owner = identity_key(identity)
        session = scope.session()
        method = request.method
        audit: dict[str, Any] = {"method": f"(http {method})"}
        if not session.allowed:
            raise _denied(
                session.reason, "no MCP grant on this endpoint", request_id,
                decision=session, audit=audit,
            )  # fmt: skip
        if query:
            raise _denied(
                Reason.MCP_REJECTED, "a query string on an MCP endpoint", request_id,
                code=INVALID_REQUEST, audit=audit,
            )  # fmt: skip
        session_ids = request.headers.getall(SESSION_HEADER, ())
        if len(session_ids) > 1:
            raise _denied(
                Reason.MCP_REJECTED, "more than one Mcp-Session-Id", request_id,
                code=INVALID_REQUEST, audit=audit,
            )  # fmt: skip
        if session_ids:
            bound = self.sessions.owner(session_ids[0])
            if bound is not None and bound != owner:
                raise _denied(
                    Reason.MCP_SESSION_MISMATCH,
                    "Mcp-Session-Id was issued to another identity",
                    request_id,
                    audit=audit,
                )
        if method in ("GET", "DELETE"):
            if request.body_exists:
                raise _denied(
                    Reason.MCP_REJECTED, f"a body on an MCP {method}", request_id,
                    code=INVALID_REQUEST, audit=audit,
                )  # fmt: skip
            responder = McpResponder(
                ListFilter(scope, {}, frozenset()),
                self.sessions,
                owner,
                filter_json=True,
                deleting_session=session_ids[0] if method == "DELETE" and session_ids else None,
            )
            return McpAuthorised(session, None, responder, audit)
        if method != "POST":
            raise _denied(
                Reason.MCP_REJECTED, f"method {method} on an MCP endpoint", request_id,
                code=INVALID_REQUEST, audit=audit,
            )  # fmt: skip
        content_types = request.headers.getall("Content-Type", ())
        if len(content_types) != 1 or not _json_content_type(content_types[0]):
            raise _denied(
                Reason.MCP_REJECTED, "Content-Type must be application/json", request_id,
                code=INVALID_REQUEST, audit=audit,
            )  # fmt: skip
        if request.headers.getall("Content-Encoding", ()):
            raise _denied(
                Reason.MCP_REJECTED, "Content-Encoding on an MCP request", request_id,
                code=INVALID_REQUEST, audit=audit,
            )  # fmt: skip
        length = request.content_length
        if length is not None and length > self.max_body:
            raise McpDeniedError(
                Reason.BODY_TOO_LARGE,
                f"Content-Length {length} > {self.max_body}",
                error_body(None, False, INVALID_REQUEST, "body too large", {}),
                audit=audit,
            )
        if answers_expect and "Expect" in request.headers and request.version >= HttpVersion11:
            # Only now: the caller holds an MCP grant here, so it may send the body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        try:
            body = await read_body(request, self.max_body)
        except OverflowError:
            raise McpDeniedError(
                Reason.BODY_TOO_LARGE,
                f"body over {self.max_body} bytes",
                error_body(None, False, INVALID_REQUEST, "body too large", {}),
                audit=audit,
            ) from None
        try:
            messages, batch = parse_messages(body)
        except _InvalidMessageError as exc:
            code = PARSE_ERROR if str(exc).startswith("parse error") else INVALID_REQUEST
            raise _denied(
                Reason.MCP_REJECTED, str(exc), request_id, code=code, audit=audit
            ) from None
        audit = _audit_record(messages, batch)
        try:
            check_mirrored_headers(request, messages, batch)
        except _InvalidMessageError as exc:
            raise _denied(
                Reason.MCP_REJECTED, str(exc), request_id, messages=messages, batch=batch,
                code=HEADER_MISMATCH, audit=audit,
            ) from None  # fmt: skip
        allowed: Decision | None = None
        for message in messages:
            if not message.known:
                raise _denied(
                    Reason.MCP_METHOD_NOT_ALLOWED,
                    f"JSON-RPC method {message.method!r} is not authorised by MCP grants",
                    request_id, messages=messages, batch=batch, audit=audit,
                )  # fmt: skip
            decision = session if message.kind is None else scope.decide(message.kind, message.name)
            if not decision.allowed:
                what = f"{message.method} {message.name!r}" if message.kind else message.method
                raise _denied(
                    decision.reason, f"{what} denied", request_id,
                    messages=messages, batch=batch, decision=decision, audit=audit,
                )  # fmt: skip
            if allowed is None or (message.kind is not None and allowed is session):
                allowed = decision  # report the grant behind the first named call
        assert allowed is not None
        list_ids = {
            key: m.list_kind
            for m in messages
            if m.list_kind is not None and (key := _id_key(m.id)) is not None
        }
        request_ids = frozenset(
            key for m in messages if m.has_id and (key := _id_key(m.id)) is not None
        )
        responder = McpResponder(
            ListFilter(scope, list_ids, request_ids),
            self.sessions,
            owner,
            filter_json=bool(list_ids),
            list_request=bool(list_ids),
        )
        return McpAuthorised(allowed, body, responder, audit)


__all__ = [
    "McpAuthorised",
    "McpDeniedError",
    "McpGate",
    "McpResponder",
    "McpUpstreamError",
    "Message",
    "SessionBindings",
    "SseFilter",
    "parse_messages",
    "strict_json",
]
