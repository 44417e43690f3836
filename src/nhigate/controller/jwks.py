"""JWK Sets the controller handles: validating fetched issuer keys, and assertion keys.

Pure functions (no I/O): `validate_jwks` decides whether a fetched document is a
usable JWK Set of public keys; `assertion_public_jwks` derives the public JWK Set
of the proxy's identity-assertion key, with the same RFC 7638 `kid` the proxy uses.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nhigate.jose import THUMBPRINT_MEMBERS, load_p256_private_key, p256_signing_jwk

_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})
MAX_KEYS = 64


class InvalidJwks(ValueError):  # noqa: N818 - reads as the condition reason it maps to
    """The document is not a usable JWK Set of public signing keys."""


def validate_jwks(data: bytes | dict[str, Any]) -> dict[str, Any]:
    """The JWK Set with its signing keys, or InvalidJwks saying what is wrong.

    Keys for encryption (`use: enc`) are dropped; private key members, unknown key
    types, missing required members or an empty result are errors.
    """
    if isinstance(data, bytes):
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise InvalidJwks(f"not JSON: {exc}") from None
    else:
        parsed = data
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise InvalidJwks('not a JWK Set: no "keys" array')
    keys: list[dict[str, Any]] = []
    for index, key in enumerate(parsed["keys"]):
        if not isinstance(key, dict):
            raise InvalidJwks(f"keys[{index}] is not an object")
        private = sorted(_PRIVATE_MEMBERS & key.keys())
        if private:
            raise InvalidJwks(f"keys[{index}] holds private key members {private}")
        kty = key.get("kty")
        required = THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
        if required is None:
            raise InvalidJwks(f"keys[{index}]: unsupported kty {kty!r}")
        missing = [m for m in required if not isinstance(key.get(m), str) or not key[m]]
        if missing:
            raise InvalidJwks(f"keys[{index}] ({kty}) lacks {missing}")
        if key.get("use", "sig") != "sig":
            continue
        keys.append(key)
    if not keys:
        raise InvalidJwks("no public signing keys")
    if len(keys) > MAX_KEYS:
        raise InvalidJwks(f"{len(keys)} keys; at most {MAX_KEYS} are accepted")
    return {"keys": keys}


def new_assertion_key() -> bytes:
    """A fresh EC P-256 private key, PKCS#8 PEM (the proxy's assertion signing key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def assertion_public_jwks(private_pem: bytes) -> dict[str, Any]:
    """The public JWK Set for an EC P-256 assertion key (kid = RFC 7638 thumbprint)."""
    return {"keys": [p256_signing_jwk(load_p256_private_key(private_pem))]}
