"""Differential tests of the proxy's JSON-RPC reading: what it authorises is what any
JSON parser reads (first-wins and last-wins on duplicates alike)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nhigate.proxy.mcp import _InvalidMessageError, parse_messages

KEYS = st.sampled_from(["jsonrpc", "id", "method", "params", "name", "uri", "arguments"])
SCALARS = st.one_of(
    st.sampled_from(["2.0", "tools/call", "tools\\u002fcall", "get_weather", "delete_all", "x"]),
    st.integers(-3, 3),
    st.none(),
)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'  # may carry \\u escapes on purpose
    return json.dumps(value)


@st.composite
def objects(draw: st.DrawFn, depth: int = 0) -> str:
    members = []
    for _ in range(draw(st.integers(0, 5))):
        key = draw(KEYS)
        if depth < 2 and draw(st.booleans()):
            value = draw(objects(depth + 1))
        else:
            value = _text(draw(SCALARS))
        members.append(f'"{key}":{value}')
    return "{" + ",".join(members) + "}"


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


@settings(max_examples=400, deadline=None)
@given(objects())
def test_an_accepted_message_reads_the_same_to_every_parser(text: str) -> None:
    body = text.encode()
    try:
        messages, _ = parse_messages(body)
    except _InvalidMessageError:
        return
    (message,) = messages
    for parsed in (json.loads(text), json.loads(text, object_pairs_hook=_first_wins)):
        assert parsed.get("method") == message.method
        if message.kind is not None:
            params = parsed["params"]
            assert params.get("name", params.get("uri")) == message.name


def test_duplicates_anywhere_are_refused() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":{"b":1,"b":2}}}'
    with pytest.raises(_InvalidMessageError, match="duplicate key"):
        parse_messages(body)
