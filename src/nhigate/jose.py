"""The JOSE pieces nhigate writes: base64url, RFC 7638 thumbprints, the P-256 assertion key.

One home for what the controller (publishing the assertion JWK Set) and the proxy (signing
assertions) must agree on byte for byte: the same key gives the same public JWK and the same
`kid`. A leaf: stdlib and cryptography only, no other nhigate package (import-linter).
"""

from __future__ import annotations

import hashlib
import json
from base64 import urlsafe_b64encode
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

THUMBPRINT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "RSA": ("e", "n"),
    "EC": ("crv", "x", "y"),
    "OKP": ("crv", "x"),
}
"""RFC 7638 section 3.2: the required public members of each key type, the thumbprint's input."""


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact_json(value: object) -> bytes:
    """JSON with sorted keys and no white space, UTF-8 (JWS headers, claims, thumbprints)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url; ValueError for other kty."""
    members = THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"no thumbprint for kty {jwk.get('kty')!r}")
    required = {"kty": jwk["kty"], **{m: jwk[m] for m in members}}
    return b64url(hashlib.sha256(compact_json(required)).digest())


def load_p256_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """An unencrypted EC P-256 private key from PEM; ValueError saying why otherwise."""
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"assertion key must be an EC P-256 private key: {exc}") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(
        loaded.curve, ec.SECP256R1
    ):
        raise ValueError("assertion key must be an EC P-256 private key")
    return loaded


def p256_signing_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """The public JWK of a P-256 key for ES256 signatures, `kid` = its RFC 7638 thumbprint."""
    numbers = key.public_key().public_numbers()
    public = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
    return {**public, "kid": jwk_thumbprint(public), "alg": "ES256", "use": "sig"}
