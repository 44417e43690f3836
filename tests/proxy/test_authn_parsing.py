"""Unit tests of the lean JWS pieces: strict base64url and JSON, JWK loading, signature checks
(cross-checked against PyJWT-signed tokens), and the claim rules."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import pytest
from jwt_factory import TestKey, b64url, claims_for, jwks_for, make_signing_key, sign

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Reason
from nhigate.proxy.jwks import JwksError, load_jwk, load_jwks
from nhigate.proxy.tokens import (
    TokenError,
    b64url_decode,
    decode_json_object,
    parse_token,
    validate_claims,
    verify_signature,
)

ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@pytest.fixture(scope="module")
def keys() -> dict[str, TestKey]:
    rsa = make_signing_key("RS256", "rsa")
    out = {alg: rsa for alg in ALGS if alg[:2] in ("RS", "PS")}
    for alg in ("ES256", "ES384", "ES512", "EdDSA"):
        out[alg] = make_signing_key(alg, alg)
    return out


# --- base64url and JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"\xff\xfe\xfd", bytes(range(256))])
def test_b64url_round_trip(data: bytes) -> None:
    assert b64url_decode(b64url(data)) == data


@pytest.mark.parametrize(
    "segment",
    ["Zg==", "Zg=", "Zh", "Z", "Zm9v+", "Zm9v/w", "Zm 9v", "Zm9v\n", "Zm9v.", "Zm9vé", "Z\x00"],
)
def test_b64url_rejects_non_canonical_and_foreign(segment: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by case on purpose
        b64url_decode(segment)


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'"x"',
        b"1",
        b"null",
        b'{"a":1,"a":1}',
        b'{"a":{"b":1,"b":2}}',
        b'{"a":[{"b":1,"b":2}]}',
        b'{"a":NaN}',
        b'{"a":-Infinity}',
        b'{"a":1e999}',
        b'{"a":"\\udc00"}',
        b"\xef\xbb\xbf{}",
        b'{"a":"\xc3"}',
        b'{"a":1} x',
        b"{" * 5000,
        b'{"a":' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"a":' + b"9" * 5000 + b"}",
    ],
)
def test_json_object_rejections(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        decode_json_object(raw)


def test_json_object_accepts_unicode() -> None:
    assert decode_json_object('{"sub":"müller 😀"}'.encode()) == {"sub": "müller 😀"}


# --- parse and verify ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_pyjwt_signed_tokens_verify(keys: dict[str, TestKey], alg: str) -> None:
    """Interop: tokens from an independent implementation (PyJWT) verify with ours."""
    key = keys[alg]
    token = jwt.encode(
        claims_for("https://i", "a"), key.private_key, algorithm=alg, headers={"kid": key.kid}
    )
    parsed = parse_token(token)
    public = load_jwk({k: v for k, v in key.public_jwk.items() if k != "alg"}).key
    assert verify_signature(public, alg, parsed.signing_input, parsed.signature)
    tampered = parsed.signing_input[:-1] + (b"A" if parsed.signing_input[-1:] != b"A" else b"B")
    assert not verify_signature(public, alg, tampered, parsed.signature)


@pytest.mark.parametrize(
    ("key_alg", "token_alg"),
    [
        ("ES256", "ES384"),
        ("ES384", "ES256"),
        ("ES256", "EdDSA"),
        ("EdDSA", "ES256"),
        ("RS256", "ES256"),
        ("ES256", "RS256"),
        ("RS256", "HS256"),
        ("RS256", "none"),
    ],
)
def test_verify_refuses_alg_that_does_not_fit_key(
    keys: dict[str, TestKey], key_alg: str, token_alg: str
) -> None:
    key = keys[key_alg]
    parsed = parse_token(sign(key, claims_for("https://i", "a")))
    public = load_jwk(key.public_jwk).key
    assert not verify_signature(public, token_alg, parsed.signing_input, parsed.signature)


def test_parse_exposes_alg_kid_and_ignores_key_urls(keys: dict[str, TestKey]) -> None:
    token = sign(keys["ES256"], {"sub": "x"}, {"jku": "http://127.0.0.1:1/", "x5u": "x"})
    parsed = parse_token(token)
    assert (parsed.alg, parsed.kid) == ("ES256", "ES256")
    assert parsed.claims == {"sub": "x"}


# --- JWK loading ---------------------------------------------------------------------------------


def _with(jwk: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(jwk)
    for name, value in changes.items():
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def test_load_jwk_rejections(keys: dict[str, TestKey]) -> None:
    rsa_jwk = keys["RS256"].public_jwk
    ec_jwk = keys["ES256"].public_jwk
    small = make_signing_key("RS256", rsa_bits=1024).public_jwk
    bad = [
        {"kty": "oct", "k": "c2VjcmV0"},
        _with(rsa_jwk, use="enc"),
        _with(rsa_jwk, key_ops=["encrypt"]),
        _with(rsa_jwk, alg="HS256"),
        _with(rsa_jwk, alg="ES256"),
        _with(rsa_jwk, kid=7),
        _with(rsa_jwk, n=...),
        _with(rsa_jwk, e="AAE"),  # e = 1
        _with(rsa_jwk, n=rsa_jwk["n"] + "="),
        small,
        _with(ec_jwk, crv="P-192"),
        _with(ec_jwk, crv="secp256k1"),
        _with(ec_jwk, x=b64url(b"\x00" * 32)),  # not on the curve
        _with(ec_jwk, y=b64url(b"\x01" * 31)),  # wrong length
        _with(ec_jwk, alg="ES384"),
        {"kty": "OKP", "crv": "X25519", "x": b64url(b"\x09" * 32)},
        {"kty": "OKP", "crv": "Ed25519", "x": b64url(b"\x09" * 31)},
        {"kty": "RSA"},
        {},
    ]
    for jwk in bad:
        with pytest.raises((ValueError, TypeError)):
            load_jwk(jwk)


def test_load_jwks_skips_bad_keys_and_dedupes(keys: dict[str, TestKey]) -> None:
    good = keys["ES256"].public_jwk
    key_set = load_jwks({"keys": [{"kty": "oct", "k": "eA"}, good, dict(good), "junk"]})
    assert len(key_set) == 1
    assert len(key_set.skipped) == 2
    assert key_set.candidates("ES256", "ES256")
    assert not key_set.candidates("ES256", "RS256")
    assert not key_set.candidates("../ES256", "ES256")


@pytest.mark.parametrize(
    "document",
    [{}, {"keys": {}}, {"keys": []}, {"keys": [{"kty": "oct", "k": "eA"}]}],
)
def test_load_jwks_without_usable_keys_fails(document: dict[str, Any]) -> None:
    with pytest.raises(JwksError):
        load_jwks(document)


def test_load_jwks_caps_key_count(keys: dict[str, TestKey]) -> None:
    many = {"keys": [_with(keys["EdDSA"].public_jwk, kid=str(i)) for i in range(65)]}
    with pytest.raises(JwksError, match="max"):
        load_jwks(many)
    assert len(load_jwks(jwks_for(keys["EdDSA"]))) == 1


# --- claims --------------------------------------------------------------------------------------

ISSUER = IssuerConfig(
    name="ci",
    issuer="https://i",
    audiences=("a", "b"),
    algorithms=("ES256",),
    max_token_lifetime_seconds=600,
    clock_skew_seconds=10,
)
NOW = 1_800_000_000.0


def _claims(**changes: Any) -> dict[str, Any]:
    return _with(claims_for("https://i", "a", now=NOW, lifetime=300), **changes)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"exp": NOW - 11, "iat": NOW - 100}, Reason.TOKEN_EXPIRED),
        ({"exp": NOW - 10, "iat": NOW - 100}, Reason.TOKEN_EXPIRED),
        ({"nbf": NOW + 11}, Reason.TOKEN_NOT_YET_VALID),
        ({"iat": NOW + 11, "exp": NOW + 100}, Reason.TOKEN_NOT_YET_VALID),
        ({"exp": NOW + 601}, Reason.TOKEN_LIFETIME_EXCEEDED),
        ({"exp": 1.5e10}, Reason.TOKEN_LIFETIME_EXCEEDED),
        ({"exp": 1e13}, Reason.TOKEN_INVALID),
        ({"exp": float("inf")}, Reason.TOKEN_INVALID),
        ({"iat": False}, Reason.TOKEN_INVALID),
        ({"aud": ["c"]}, Reason.AUDIENCE_MISMATCH),
        ({"aud": ["x"] * 65 + ["a"]}, Reason.TOKEN_INVALID),
        ({"sub": "x" * 1025}, Reason.TOKEN_INVALID),
        ({"sub": None}, Reason.TOKEN_INVALID),
        ({"jti": ""}, Reason.TOKEN_INVALID),
    ],
)
def test_claim_rules(changes: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(TokenError) as info:
        validate_claims(_claims(**changes), ISSUER, NOW)
    assert info.value.reason is reason


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"exp": NOW - 9, "iat": NOW - 100},
        {"nbf": NOW + 9},
        {"iat": NOW + 9, "exp": NOW + 300},
        {"exp": NOW + 600},
        {"aud": ["z", "b"]},
        {"iat": NOW + 0.5, "exp": NOW + 100.25},
        {"jti": ...},
    ],
)
def test_claim_rules_accept(changes: dict[str, Any]) -> None:
    validated = validate_claims(_claims(**changes), ISSUER, NOW)
    assert validated.identity.subject == "ci-deployer"
    assert validated.not_before <= NOW < validated.expires_at


def test_identity_claims_are_read_only() -> None:
    validated = validate_claims(_claims(), ISSUER, NOW)
    with pytest.raises(TypeError):
        validated.identity.claims["sub"] = "admin"  # type: ignore[index]


def test_b64_helper_matches_stdlib() -> None:
    assert b64url(b"\xfb\xff") == base64.urlsafe_b64encode(b"\xfb\xff").decode().rstrip("=")
