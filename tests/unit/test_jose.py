"""nhigate.jose: the thumbprint and key encoding the controller and the proxy share."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nhigate.controller.jwks import assertion_public_jwks, new_assertion_key
from nhigate.jose import b64url, jwk_thumbprint, load_p256_private_key, p256_signing_jwk
from nhigate.proxy.assertion import AssertionSigner

# RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FD"
    "W2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vM"
    "QFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_rfc7638_example_thumbprint() -> None:
    assert jwk_thumbprint(RFC7638_KEY) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_thumbprint_ignores_optional_members_and_refuses_unknown_types() -> None:
    bare = {"kty": "RSA", "n": RFC7638_KEY["n"], "e": "AQAB"}
    assert jwk_thumbprint(bare) == jwk_thumbprint({**bare, "use": "sig", "kid": "other"})
    with pytest.raises(ValueError, match="kty"):
        jwk_thumbprint({"kty": "oct", "k": "c2VjcmV0"})


def test_b64url_has_no_padding_and_url_alphabet() -> None:
    assert b64url(b"\xfb\xff") == "-_8"
    assert b64url(b"") == ""


def test_controller_publishes_the_kid_the_proxy_signs_with() -> None:
    pem = new_assertion_key()
    (published,) = assertion_public_jwks(pem)["keys"]
    signer = AssertionSigner(pem)
    assert published == signer.public_jwks()["keys"][0]
    assert published["kid"] == signer.kid == jwk_thumbprint(published)


def test_p256_signing_jwk_is_public_only() -> None:
    jwk = p256_signing_jwk(ec.generate_private_key(ec.SECP256R1()))
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")


@pytest.mark.parametrize(
    "pem",
    [
        b"not a key",
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    ],
    ids=["garbage", "p384", "rsa", "encrypted"],
)
def test_only_an_unencrypted_p256_key_loads(pem: bytes) -> None:
    with pytest.raises(ValueError, match="EC P-256 private key"):
        load_p256_private_key(pem)
