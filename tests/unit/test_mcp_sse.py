"""The incremental SSE list filter: event framing as SSE clients read it, byte for byte."""

from __future__ import annotations

import orjson
import pytest

from nhigate.policy import (
    Grant,
    Identity,
    IdentityKind,
    McpRule,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    make_document,
)
from nhigate.policy.mcp import mcp_scope
from nhigate.proxy.mcp import ListFilter, ListKind, SseFilter

SERVICE = ServiceConfig("ns", "svc", "api", 80, mcp_endpoints=("/mcp",))
GRANT = Grant("ns/g", (TokenSubject("iss", "a"),), (Rule(frozenset(), (), McpRule(tools=("ok",))),))
POLICY = compile_policy(make_document(SERVICE, (), (GRANT,), ()))
LISTED = orjson.dumps(
    {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "ok"}, {"name": "secret"}]}}
)


def sse(max_event: int = 1 << 20) -> SseFilter:
    scope = mcp_scope(POLICY, Identity(IdentityKind.JWT, "iss", "a"), "/mcp", 0.0, None)
    return SseFilter(
        ListFilter(scope, {("i", 1): ListKind.TOOLS}, frozenset({("i", 1)})), max_event
    )


def run(stream: list[bytes], f: SseFilter | None = None) -> bytes:
    f = f or sse()
    return b"".join(f.feed(chunk) for chunk in stream) + f.close()


def test_unchanged_events_pass_byte_for_byte() -> None:
    raw = b': keep-alive\r\n\r\nid: 1\nevent: message\ndata: {"jsonrpc":"2.0","method":"x"}\n\n'
    assert run([raw]) == raw
    assert run([raw[i : i + 1] for i in range(len(raw))]) == raw  # one byte at a time


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_list_results_are_filtered_whatever_the_line_endings(eol: bytes) -> None:
    half = LISTED.index(b",") + 1  # multi-line data is joined with "\n": split between tokens
    raw = b"id: 9" + eol + b"data: " + LISTED[:half] + eol + b"data: " + LISTED[half:] + eol + eol
    out = run([raw[:7], raw[7:30], raw[30:]])
    assert b"secret" not in out
    assert out.startswith(b"id: 9\n")
    message = orjson.loads(out.split(b"data: ", 1)[1])
    assert [t["name"] for t in message["result"]["tools"]] == ["ok"]


def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    raw = b"data: " + LISTED + b"\r\n\r\n"
    out = run([raw[:-3], raw[-3:-2], raw[-2:-1], raw[-1:]])
    assert out.count(b"data: ") == 1
    assert b"secret" not in out


def test_an_event_is_released_as_soon_as_it_is_complete() -> None:
    f = sse()
    assert f.feed(b'data: {"jsonrpc":"2.0","method":"p"}\n') == b""
    assert f.feed(b"\n") == b'data: {"jsonrpc":"2.0","method":"p"}\n\n'
    assert f.feed(b"data: {") == b""


def test_a_leading_bom_is_read_as_clients_read_it() -> None:
    out = run([b"\xef\xbb", b"\xbfdata: " + LISTED + b"\n\n"])
    assert b"secret" not in out
    assert not out.startswith(b"\xef\xbb\xbf")


def test_priming_events_without_data_pass_and_non_json_data_is_dropped() -> None:
    f = sse()
    assert run([b"id: 42\ndata:\n\n"], f) == b"id: 42\ndata:\n\n"
    dup = b'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"secret"}]}}\n\n'
    f = sse()
    assert run([dup, b"data: not json\n\n"], f) == b""
    assert f.dropped == 2


def test_an_oversized_event_is_refused() -> None:
    f = sse(max_event=100)
    with pytest.raises(ValueError, match="SSE event longer"):
        f.feed(b"data: " + b"x" * 200)
