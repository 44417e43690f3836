"""Name patterns for MCP tools, resources, prompts and delegation actors (docs/mcp.md).

A pattern is printable ASCII where `*` matches any run of characters (also none)
and every other character is literal and case-sensitive: `get_weather`,
`search_*`, `file:///docs/*`, `*`. Names compared against patterns must be
printable ASCII as well: a name with anything else (a Unicode look-alike, a
space, a control character) is never matched, so a pattern cannot be satisfied
by a string that only *looks* like the granted one.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

MAX_NAME_LENGTH: Final = 2048
"""Longest name or pattern (a resource URI can be long; tool names SHOULD be <= 128)."""

_PRINTABLE: Final = re.compile(r"[\x21-\x7e]+")

MCP_ENDPOINT_PATTERN: Final = r"^(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+$|^/$"
"""An MCP endpoint: an exact path of unreserved characters, no dot-segments, no trailing
slash (the proxy treats the endpoint's subtree, in any letter case, as the endpoint)."""
_MCP_ENDPOINT: Final = re.compile(MCP_ENDPOINT_PATTERN)


def is_mcp_endpoint_path(path: str) -> bool:
    """True for a valid MCP endpoint path such as `/mcp` (see `MCP_ENDPOINT_PATTERN`)."""
    return len(path) <= 1024 and _MCP_ENDPOINT.fullmatch(path) is not None


def is_plain_name(name: str) -> bool:
    """True for a non-empty printable-ASCII string of at most `MAX_NAME_LENGTH` characters."""
    return 0 < len(name) <= MAX_NAME_LENGTH and _PRINTABLE.fullmatch(name) is not None


def name_pattern_problem(pattern: str, *, uri: bool = False) -> str | None:
    """Why `pattern` is not a valid name pattern, or None when it is."""
    if not pattern:
        return "must not be empty"
    if len(pattern) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    if _PRINTABLE.fullmatch(pattern) is None:
        what = "a URI pattern" if uri else "a name pattern"
        return f"{pattern!r} is not {what}: printable ASCII only, no spaces ('*' is the wildcard)"
    if "**" in pattern:
        return f"{pattern!r}: write '*' once (it already matches any run of characters)"
    return None


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    if "*" not in pattern:
        return None
    return re.compile(".*".join(map(re.escape, pattern.split("*"))), re.DOTALL)


def name_matches(pattern: str, name: str) -> bool:
    """Does `name` (printable ASCII, see `is_plain_name`) match the name `pattern`?"""
    if pattern == "*":
        return is_plain_name(name)
    regex = _compiled(pattern)
    if regex is None:
        return pattern == name
    return regex.fullmatch(name) is not None and is_plain_name(name)


def any_name_matches(patterns: tuple[str, ...], name: str) -> bool:
    """True when one of `patterns` matches `name`."""
    return any(name_matches(p, name) for p in patterns)
