"""Issuer JWK Set validation and the assertion key's public JWKS."""

from __future__ import annotations

import json

import pytest

from nhigate.controller.jwks import (
    InvalidJwks,
    assertion_public_jwks,
    new_assertion_key,
    validate_jwks,
)

EC_KEY = {"kty": "EC", "crv": "P-256", "x": "abc", "y": "def", "kid": "1"}


def test_valid_set_keeps_signing_keys_only() -> None:
    enc = {**EC_KEY, "kid": "2", "use": "enc"}
    assert validate_jwks(json.dumps({"keys": [EC_KEY, enc]}).encode()) == {"keys": [EC_KEY]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", 'no "keys" array'),
        (b'{"keys": []}', "no public signing keys"),
        (json.dumps({"keys": [{**EC_KEY, "d": "secret"}]}).encode(), "private key members"),
        (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(), "private key members"),
        (json.dumps({"keys": [{"kty": "oct"}]}).encode(), "unsupported kty"),
        (json.dumps({"keys": [{"kty": "RSA", "n": "x"}]}).encode(), "lacks ['e']"),
        (json.dumps({"keys": [{**EC_KEY, "use": "enc"}]}).encode(), "no public signing keys"),
    ],
)
def test_invalid_sets_are_refused(document: bytes, message: str) -> None:
    with pytest.raises(InvalidJwks, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_jwks(document)


def test_assertion_jwks_is_public_and_stable() -> None:
    pem = new_assertion_key()
    jwks = assertion_public_jwks(pem)
    (key,) = jwks["keys"]
    assert (key["kty"], key["crv"], key["alg"]) == ("EC", "P-256", "ES256")
    assert "d" not in key
    assert assertion_public_jwks(pem) == jwks  # kid is a thumbprint: same key, same kid
    assert assertion_public_jwks(new_assertion_key())["keys"][0]["kid"] != key["kid"]
    with pytest.raises(ValueError, match="P-256"):
        assertion_public_jwks(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
