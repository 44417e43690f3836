"""grpc.py: the method a path names, the status a refusal maps to, grpc-message encoding."""

from __future__ import annotations

import pytest

from nhigate.proxy.grpc import encode_message, grpc_method, grpc_status, is_grpc, trailers_only


@pytest.mark.parametrize(
    ("http", "code"),
    [
        (401, 16),
        (403, 7),
        (429, 8),
        (413, 8),
        (431, 8),
        (502, 14),
        (503, 14),
        (504, 4),
        (408, 4),
        (400, 13),
        (500, 13),
        (418, 2),
    ],
)
def test_refusal_status_mapping(http: int, code: int) -> None:
    assert grpc_status(http) == code


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("Application/GRPC+json", True),
        ("application/grpc;charset=utf-8", True),
        ("application/grpc-web", False),
        ("application/grpcx", False),
        ("application/json", False),
        (None, False),
    ],
)
def test_is_grpc(value: str | None, expected: bool) -> None:
    assert is_grpc(value) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/pkg.Svc/Method", ("pkg.Svc", "Method")),
        ("/Svc/M", ("Svc", "M")),
        ("/pkg.Svc/", None),
        ("/pkg.Svc", None),
        ("//Method", None),
        ("/a/b/c", None),
        ("pkg.Svc/Method", None),
    ],
)
def test_grpc_method(path: str, expected: tuple[str, str] | None) -> None:
    assert grpc_method(path) == expected


def test_grpc_message_is_percent_encoded() -> None:
    assert encode_message("no_matching_grant") == b"no_matching_grant"
    assert encode_message("100% sure\r\n") == b"100%25 sure%0D%0A"
    assert encode_message("caf\u00e9") == b"caf%C3%A9"


def test_trailers_only_shape() -> None:
    headers = trailers_only(403, "denied", [(b"x-request-id", b"abc")])
    assert headers == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"7"),
        (b"grpc-message", b"denied"),
        (b"x-request-id", b"abc"),
    ]
