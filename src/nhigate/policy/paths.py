"""Request-path normalisation and the grant path-pattern grammar.

The proxy normalises a request path exactly once with `normalise_path()`,
authorises the result and forwards the same result upstream, so the path that
was authorised is the path the backend receives. Anything that cannot be
normalised without guessing how the backend would read it is rejected.
The precise rules are in docs/path-grammar.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

MAX_PATH_LENGTH = 8192
"""Longest raw request path (and longest canonical path) accepted, in characters."""

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may appear literally in a canonical path segment (RFC 3986 pchar).
_PCHAR_LITERAL = _UNRESERVED | frozenset("!$&'()*+,;=:@")
# Printable ASCII that is not allowed literally in a path but has one unambiguous meaning:
# canonicalised to its percent-encoding.
_ENCODE_LITERAL = frozenset(' "<>^`{|}')
# The common case: only pchar and "/", no "%", no dot-segments, no "//" -> already canonical.
_SEG = r"[A-Za-z0-9\-_~!$&'()*+,;=:@][A-Za-z0-9\-._~!$&'()*+,;=:@]*+"
_FAST_CANONICAL = re.compile(rf"/(?:{_SEG}(?:/{_SEG})*+/?)?")
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")


class PathRejected(ValueError):  # noqa: N818 (name is part of the shared vocabulary)
    """The request path cannot be normalised safely; the request must be denied.

    `reason` is a short machine-readable tag (e.g. ``encoded_slash``) for the audit log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _decode_segment(raw: str) -> str:
    """Canonicalise one raw segment: decode unreserved escapes, encode the rest uppercase."""
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        c = raw[i]
        if c == "%":
            hexpair = raw[i + 1 : i + 3]
            if len(hexpair) != 2 or hexpair[0] not in _HEX or hexpair[1] not in _HEX:
                raise PathRejected("invalid_percent_encoding", f"bad escape at offset {i}")
            byte = int(hexpair, 16)
            if byte == 0x2F:
                raise PathRejected("encoded_slash", "%2F is not allowed in a path")
            if byte == 0x5C:
                raise PathRejected("encoded_backslash", "%5C is not allowed in a path")
            if byte < 0x20 or byte == 0x7F:
                raise PathRejected("control_character", f"encoded control byte 0x{byte:02X}")
            ch = chr(byte)
            out.append(ch if ch in _UNRESERVED else f"%{byte:02X}")
            i += 3
            continue
        code = ord(c)
        if c in _PCHAR_LITERAL:
            out.append(c)
        elif c == "\\":
            raise PathRejected("backslash", "a literal backslash is not allowed in a path")
        elif code < 0x20 or code == 0x7F:
            raise PathRejected("control_character", f"control character 0x{code:02X}")
        elif code > 0x7F:
            raise PathRejected("non_ascii", "raw non-ASCII characters must be percent-encoded")
        elif c in _ENCODE_LITERAL:
            out.append(f"%{code:02X}")
        else:  # "?", "#" and "[", "]": they would change the meaning of the URI
            raise PathRejected("invalid_character", f"character {c!r} is not allowed in a path")
        i += 1
    return "".join(out)


def _is_parameterised_dot(segment: str) -> bool:
    """`..;x` / `.;x`: some servlet containers strip `;params` and then see a dot-segment."""
    head = segment.split(";", 1)[0].split("%3B", 1)[0]
    return head != segment and head in (".", "..")


def _check_utf8(canonical: str) -> None:
    """Percent-encoded bytes must spell valid UTF-8 (no overlong `%C0%AE` dot tricks)."""
    if "%" not in canonical:
        return
    raw = bytearray()
    i = 0
    n = len(canonical)
    while i < n:
        c = canonical[i]
        if c == "%":
            raw.append(int(canonical[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(c))
            i += 1
    try:
        bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise PathRejected("invalid_utf8", "percent-encoded bytes are not valid UTF-8") from None


def normalise_path(raw: str) -> str:
    """Return the canonical form of a raw request path, or raise `PathRejected`.

    `raw` is the path part of the request target, before any decoding and
    without the query string. The result is idempotent
    (``normalise_path(normalise_path(p)) == normalise_path(p)``), case-sensitive,
    and is what the proxy both authorises and forwards.
    """
    if len(raw) > MAX_PATH_LENGTH:
        raise PathRejected("too_long", f"path longer than {MAX_PATH_LENGTH} characters")
    if not raw.startswith("/"):
        raise PathRejected("not_absolute", "path must start with '/'")
    if _FAST_CANONICAL.fullmatch(raw) is not None and "/." not in raw:
        return raw
    segments = raw[1:].split("/")
    out: list[str] = []
    trailing_slash = False
    last = len(segments) - 1
    for index, raw_segment in enumerate(segments):
        segment = _decode_segment(raw_segment)
        is_last = index == last
        if segment in ("", "."):
            # Empty segments ("//") collapse; "." disappears; both keep a final slash.
            trailing_slash = is_last
            continue
        if segment == "..":
            if not out:
                raise PathRejected("above_root", "'..' would climb above the root")
            out.pop()
            trailing_slash = is_last
            continue
        if _is_parameterised_dot(segment):
            raise PathRejected("dot_segment_parameter", f"segment {segment!r} hides a dot-segment")
        out.append(segment)
        trailing_slash = False
    if not out:
        return "/"
    canonical = "/" + "/".join(out) + ("/" if trailing_slash else "")
    if len(canonical) > MAX_PATH_LENGTH:
        raise PathRejected("too_long", f"canonical path longer than {MAX_PATH_LENGTH} characters")
    if _DOUBLE_ENCODED.search(canonical) is not None:
        raise PathRejected("double_encoding", "'%25' followed by hex digits decodes to an escape")
    _check_utf8(canonical)
    return canonical


def is_canonical_path(path: str) -> bool:
    """True when `path` is its own normal form (cheap for the common, already-clean path)."""
    if _FAST_CANONICAL.fullmatch(path) is not None and "/." not in path:
        return len(path) <= MAX_PATH_LENGTH
    try:
        return normalise_path(path) == path
    except PathRejected:
        return False


def path_segments(path: str) -> list[str]:
    """Split a canonical path into segments: "/" -> [""], "/a/b/" -> ["a", "b", ""]."""
    return path[1:].split("/")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """One compiled grant path pattern (see docs/path-grammar.md).

    `segments` are the literal-or-`*` segments; `subtree` is True when the
    pattern ended in `/**`, in which case `segments` is the prefix.
    """

    pattern: str
    segments: tuple[str, ...]
    subtree: bool

    @classmethod
    def compile(cls, pattern: str) -> PathPattern:
        """Parse and validate `pattern`; raise ValueError with a readable message if invalid."""
        if not isinstance(pattern, str):
            raise ValueError(f"path pattern must be a string, got {type(pattern).__name__}")
        return _compile_pattern(pattern)

    @classmethod
    def _parse(cls, pattern: str) -> PathPattern:
        if not pattern.startswith("/"):
            raise ValueError(f"path pattern {pattern!r} must start with '/'")
        if "//" in pattern:
            raise ValueError(f"path pattern {pattern!r} must not contain '//'")
        parts = pattern[1:].split("/")
        for part in parts:
            if part in (".", "..") or part.lower() in ("%2e", "%2e%2e", ".%2e", "%2e."):
                raise ValueError(f"path pattern {pattern!r} must not contain dot-segments")
            if "*" in part and part not in ("*", "**"):
                raise ValueError(
                    f"path pattern {pattern!r}: '*' and '**' must be whole segments "
                    "(write %2A for a literal '*')"
                )
        if "**" in parts[:-1]:
            raise ValueError(f"path pattern {pattern!r}: '**' is only allowed as the last segment")
        try:
            canonical = normalise_path(pattern)
        except PathRejected as exc:
            raise ValueError(f"path pattern {pattern!r} is not a valid path: {exc}") from None
        if canonical != pattern:
            raise ValueError(
                f"path pattern {pattern!r} is not in canonical form; write {canonical!r}"
            )
        if parts[-1] == "**":
            return cls(pattern, tuple(parts[:-1]), subtree=True)
        return cls(pattern, tuple(parts), subtree=False)

    def matches(self, path: str) -> bool:
        """True when the canonical `path` matches this pattern."""
        return self.matches_segments(path_segments(path))

    def matches_segments(self, segments: list[str]) -> bool:
        """Like `matches`, for a path already split with `path_segments`."""
        mine = self.segments
        if self.subtree:
            if len(segments) < len(mine):
                return False
        elif len(segments) != len(mine):
            return False
        for want, got in zip(mine, segments, strict=False):
            if want == "*":
                if got == "":
                    return False
            elif want != got:
                return False
        return True


@lru_cache(maxsize=65536)
def _compile_pattern(pattern: str) -> PathPattern:
    # Documents repeat patterns and the proxy re-validates on every reload: parse each once.
    return PathPattern._parse(pattern)
