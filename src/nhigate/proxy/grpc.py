"""gRPC as the proxy sees it: which method a request calls, and a refusal in gRPC's terms.

A gRPC call is an HTTP/2 `POST /package.Service/Method` with `content-type: application/grpc`
(`+proto`, `+json`, ...). Grants name methods by that path, so the pipeline needs nothing
gRPC-specific to decide; what is specific is the answer. A gRPC client reads its status from
`grpc-status` in the trailers, so a refusal is a *trailers-only* response: one HEADERS frame
with `:status 200`, `content-type: application/grpc`, `grpc-status` and `grpc-message`, and
END_STREAM. The HTTP status of the refusal is kept in the audit record.

The mapping follows gRPC's own "HTTP to gRPC status code mapping" (doc/http-grpc-status-
mapping.md) where it is specific, and says what the refusal means where the proxy knows
better than an HTTP intermediary would:

- 401 -> 16 UNAUTHENTICATED, 403 -> 7 PERMISSION_DENIED (as in that document);
- 429 and 413 -> 8 RESOURCE_EXHAUSTED: the caller exceeded a quota (its rate limit, the body
  size); the document's 429 -> UNAVAILABLE describes an overloaded server a client should
  retry against, which a per-identity rate limit is not;
- 502, 503 -> 14 UNAVAILABLE (retryable: the backend is down, or no policy is loaded yet);
- 504 and 408 -> 4 DEADLINE_EXCEEDED;
- 400 -> 13 INTERNAL, as the document has it: what the proxy refuses with 400 is the shape
  of the request (its path, headers, framing), which a gRPC stub builds, not the call's
  arguments; INVALID_ARGUMENT would tell the caller to fix a field of its message;
- 431 -> 8 RESOURCE_EXHAUSTED (the metadata is over the size bound), 500 -> 13 INTERNAL,
  anything else -> 2 UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

OK: Final = 0
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
UNAUTHENTICATED: Final = 16

STATUS_FOR_HTTP: dict[int, int] = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    500: INTERNAL,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}
"""The `grpc-status` of a refusal the proxy would answer over HTTP with this status."""


def is_grpc(content_type: str | None) -> bool:
    """A gRPC request: `application/grpc` optionally followed by `+format` or `;params`."""
    if content_type is None:
        return False
    lowered = content_type.strip().lower()
    if not lowered.startswith("application/grpc"):
        return False
    rest = lowered[len("application/grpc") :]
    return rest == "" or rest[0] in "+;"


def grpc_method(path: str) -> tuple[str, str] | None:
    """`(service, method)` of a gRPC path `/package.Service/Method`, else None."""
    if not path.startswith("/"):
        return None
    service, sep, method = path[1:].partition("/")
    if not sep or not service or not method or "/" in method:
        return None
    return service, method


def grpc_status(http_status: int) -> int:
    """The gRPC status code for a refusal with `http_status` (see the module docstring)."""
    return STATUS_FOR_HTTP.get(http_status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """`grpc-message` percent-encoding: printable ASCII but `%` as is, the rest as %XX of
    its UTF-8 (the gRPC HTTP/2 protocol's Percent-Encoded grammar)."""
    out = bytearray()
    for byte in message.encode("utf-8", "surrogatepass"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out.extend(b"%%%02X" % byte)
    return bytes(out)


def trailers_only(
    http_status: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    """The header block of a trailers-only refusal (sent with END_STREAM)."""
    headers = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(grpc_status(http_status)).encode("ascii")),
        (b"grpc-message", encode_message(message)),
    ]
    headers.extend(extra)
    return headers
