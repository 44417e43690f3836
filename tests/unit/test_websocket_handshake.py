"""The WebSocket handshake checks, the frame-boundary follower and the opt-in's encoding."""

from __future__ import annotations

import json
import os

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

from nhigate.api.compile import compile_service
from nhigate.api.models import API_VERSION, ProtectedService
from nhigate.policy import ServiceConfig, make_document
from nhigate.policy.encoding import PolicyDocumentError, decode_document, encode_document
from nhigate.proxy.websocket import (
    FrameBoundary,
    UpgradeRefusedError,
    accept_value,
    close_frame,
    handshake_key,
    switched,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3


def _headers(**values: str | list[str]) -> CIMultiDictProxy[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            out.add(name.replace("_", "-"), item)
    return CIMultiDictProxy(out)


GOOD = {
    "Connection": "keep-alive, Upgrade",
    "Upgrade": "WebSocket",
    "Sec_WebSocket_Version": "13",
    "Sec_WebSocket_Key": KEY,
}


def test_the_rfc_example_accept_value() -> None:
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_well_formed_handshake_yields_its_key() -> None:
    assert handshake_key("GET", True, _headers(**GOOD)) == KEY


@pytest.mark.parametrize(
    ("change", "method", "http11", "problem"),
    [
        ({"Upgrade": "h2c"}, "GET", True, "only Upgrade: websocket"),
        ({"Upgrade": ["websocket", "websocket"]}, "GET", True, "only Upgrade: websocket"),
        ({"Upgrade": "websocket, h2c"}, "GET", True, "only Upgrade: websocket"),
        ({}, "POST", True, "is a GET"),
        ({}, "GET", False, "HTTP/1.1"),
        ({"Connection": "keep-alive"}, "GET", True, "Connection: upgrade"),
        ({"Content_Length": "5"}, "GET", True, "no body"),
        ({"Transfer_Encoding": "chunked"}, "GET", True, "no body"),
        ({"Sec_WebSocket_Version": "8"}, "GET", True, "must be 13"),
        ({"Sec_WebSocket_Key": "c2hvcnQ="}, "GET", True, "16 bytes"),
        ({"Sec_WebSocket_Key": "not base64!!"}, "GET", True, "16 bytes"),
        ({"Sec_WebSocket_Key": [KEY, KEY]}, "GET", True, "exactly one"),
    ],
)
def test_every_malformed_handshake_is_refused(
    change: dict[str, str | list[str]], method: str, http11: bool, problem: str
) -> None:
    with pytest.raises(UpgradeRefusedError, match=problem):
        handshake_key(method, http11, _headers(**{**GOOD, **change}))


def _answer(*lines: bytes) -> list[tuple[bytes, bytes]]:
    return [tuple(line.split(b": ", 1)) for line in lines]  # type: ignore[misc]


def test_only_a_101_with_the_right_accept_switches() -> None:
    accept = accept_value(KEY).encode()
    good = _answer(
        b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept
    )
    assert switched(101, good, KEY)
    assert not switched(200, good, KEY)
    assert not switched(101, good, "AAAAAAAAAAAAAAAAAAAAAA==")
    assert not switched(101, good[1:], KEY)  # no Upgrade
    assert not switched(101, [good[0], good[2]], KEY)  # no Connection: upgrade
    h2c = _answer(b"Upgrade: h2c", b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + accept)
    assert not switched(101, h2c, KEY)
    assert not switched(101, [*good, good[2]], KEY)  # two accept values


def _frame(payload: bytes, *, masked: bool = False, opcode: int = 2) -> bytes:
    size = len(payload)
    mask = 0x80 if masked else 0
    if size < 126:
        head = bytes((0x80 | opcode, mask | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, mask | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, mask | 127)) + size.to_bytes(8, "big")
    return head + (os.urandom(4) if masked else b"") + payload


@pytest.mark.parametrize("split", [1, 2, 3, 7, 100, 4096, 70000])
def test_frame_boundaries_are_followed_across_any_split(split: int) -> None:
    stream = b"".join(
        _frame(p, masked=m)
        for p, m in [(b"a", False), (b"x" * 300, True), (b"y" * 70000, False), (b"", True)]
    )
    boundaries = {0}
    pos = 0
    for p, m in [(b"a", False), (b"x" * 300, True), (b"y" * 70000, False), (b"", True)]:
        pos += len(_frame(p, masked=m))
        boundaries.add(pos)
    follower = FrameBoundary()
    fed = 0
    while fed < len(stream):
        piece = stream[fed : fed + split]
        follower.feed(piece)
        fed += len(piece)
        assert follower.at_boundary == (fed in boundaries), fed


def test_the_close_frame_is_unmasked_with_code_and_reason() -> None:
    frame = close_frame(1008, "revoked")
    assert frame == b"\x88\x09\x03\xf0revoked"
    assert len(close_frame(1008, "x" * 500)) == 2 + 125


# -- the opt-in: spec.websocket.paths -> ServiceConfig.websocket_paths -> policy document ----------


def test_websocket_paths_travel_in_the_document_only_when_set() -> None:
    plain = ServiceConfig("ns", "svc", "api", 80)
    assert "websocket" not in encode_document(make_document(plain, (), (), ())).decode()
    declared = ServiceConfig("ns", "svc", "api", 80, websocket_paths=("/ws", "/rooms/*/ws"))
    again = decode_document(encode_document(make_document(declared, (), (), ())))
    assert again.service.websocket_paths == ("/ws", "/rooms/*/ws")


@pytest.mark.parametrize("bad", [["/ws/../admin"], ["ws"], ["/ws", "/ws"], []])
def test_decoding_refuses_bad_websocket_paths(bad: list[str]) -> None:
    declared = ServiceConfig("ns", "svc", "api", 80, websocket_paths=("/ws",))
    obj = json.loads(encode_document(make_document(declared, (), (), ())))
    obj["service"]["websocketPaths"] = bad
    with pytest.raises(PolicyDocumentError, match="websocketPaths"):
        decode_document(json.dumps(obj).encode())


def _service(**spec: object) -> ProtectedService:
    return ProtectedService.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "ProtectedService",
            "metadata": {"name": "svc", "namespace": "ns"},
            "spec": {"backend": {"service": "api", "port": 80}, "issuers": ["ci"], **spec},
        }
    )


def test_the_protected_service_opts_in_per_path() -> None:
    assert compile_service(_service()).websocket_paths == ()
    compiled = compile_service(_service(websocket={"paths": ["/ws", "/rooms/*/ws"]}))
    assert compiled.websocket_paths == ("/ws", "/rooms/*/ws")


@pytest.mark.parametrize("paths", [[], ["/ws/../x"], ["/a/**/b"], ["/ws", "/ws"]])
def test_the_protected_service_refuses_bad_websocket_paths(paths: list[str]) -> None:
    with pytest.raises(ValidationError):
        _service(websocket={"paths": paths})
