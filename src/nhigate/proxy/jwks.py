"""JSON Web Key Sets: parse JWKs into ready-to-use public keys, and fetch a JWKS over HTTP.

Parsing is strict per key and tolerant per set: a key this proxy cannot use
(HMAC `oct`, encryption-only, too-short RSA, unknown curve, malformed
coordinates) is skipped with a note, the rest of the set still loads. Public
key objects are built once here so a signature check does no key parsing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from nhigate.proxy.tokens import (
    SUPPORTED_ALGORITHMS,
    PublicKey,
    b64url_decode,
    decode_json_object,
    key_matches_alg,
)

MIN_RSA_BITS = 2048
MAX_KEYS = 64
"""More keys than this in one set is treated as an invalid JWKS (bounded memory and work)."""
MAX_JWKS_BYTES = 256 * 1024

_EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}


class JwksError(Exception):
    """A JWKS could not be fetched or holds no usable key; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One usable public key from a JWKS."""

    kid: str | None
    key: PublicKey
    alg: str | None
    """The JWK's `alg`, when it pins one: tokens must then use exactly that alg."""
    fingerprint: str
    """Canonical JSON of the public parameters; equal fingerprints mean the same key."""

    def accepts(self, alg: str) -> bool:
        """True when a token signed with `alg` may be checked against this key."""
        return (self.alg is None or self.alg == alg) and key_matches_alg(self.key, alg)


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one issuer, indexed by kid."""

    by_kid: Mapping[str, tuple[VerificationKey, ...]] = field(default_factory=dict)
    without_kid: tuple[VerificationKey, ...] = ()
    fingerprint: frozenset[str] = frozenset()
    skipped: tuple[str, ...] = ()
    """Why keys in the source set were not loaded (safe to log)."""

    def __len__(self) -> int:
        return len(self.fingerprint)

    def candidates(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        """Keys a token with this `kid` and `alg` may be verified against.

        With a kid: only keys carrying exactly that kid (a plain dict lookup, so
        path-like or injected kids simply do not match). Without a kid: every key
        of the set that accepts `alg`.
        """
        if kid is not None:
            return tuple(k for k in self.by_kid.get(kid, ()) if k.accepts(alg))
        pool = [k for keys in self.by_kid.values() for k in keys] + list(self.without_kid)
        return tuple(k for k in pool if k.accepts(alg))

    def has_kid(self, kid: str) -> bool:
        """True when some key in the set carries this kid (regardless of alg)."""
        return kid in self.by_kid


def _b64_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing {name}")
    return int.from_bytes(b64url_decode(value), "big")


def _b64_fixed(jwk: Mapping[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"missing {name}")
    raw = b64url_decode(value)
    if len(raw) != size:
        raise ValueError(f"{name} has wrong length")
    return raw


def load_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """Build a verification key from one public JWK. Raises ValueError when unusable."""
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("non-string kid")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use={use!r} is not sig")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("key_ops does not allow verify")
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS):
        raise ValueError(f"unsupported alg {alg!r}")
    key: PublicKey
    if kty == "RSA":
        n, e = _b64_int(jwk, "n"), _b64_int(jwk, "e")
        if n.bit_length() < MIN_RSA_BITS:
            raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
        if e < 3 or e % 2 == 0:
            raise ValueError("bad RSA exponent")
        key = rsa.RSAPublicNumbers(e, n).public_key()
        params: dict[str, Any] = {"kty": kty, "n": jwk["n"], "e": jwk["e"]}
    elif kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise ValueError(f"unsupported curve {crv!r}")
        curve, size = _EC_CURVES[crv]
        x = int.from_bytes(_b64_fixed(jwk, "x", size), "big")
        y = int.from_bytes(_b64_fixed(jwk, "y", size), "big")
        key = ec.EllipticCurvePublicNumbers(
            x, y, curve
        ).public_key()  # checks the point is on the curve
        params = {"kty": kty, "crv": crv, "x": jwk["x"], "y": jwk["y"]}
    elif kty == "OKP":
        crv = jwk.get("crv")
        if crv == "Ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(_b64_fixed(jwk, "x", 32))
        elif crv == "Ed448":
            key = ed448.Ed448PublicKey.from_public_bytes(_b64_fixed(jwk, "x", 57))
        else:
            raise ValueError(f"unsupported OKP curve {crv!r}")
        params = {"kty": kty, "crv": crv, "x": jwk["x"]}
    else:
        raise ValueError(f"unsupported kty {kty!r}")  # `oct` (HMAC secrets) lands here on purpose
    if alg is not None and not key_matches_alg(key, alg):
        raise ValueError(f"alg {alg} does not fit the key type")
    params.update(kid=kid, alg=alg)
    fingerprint = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return VerificationKey(kid=kid, key=key, alg=alg, fingerprint=fingerprint)


def load_jwks(document: Mapping[str, Any]) -> KeySet:
    """Parse a JWK Set. Unusable keys are skipped (listed in `skipped`); raises JwksError when
    the document is not a JWKS, has too many keys, or holds no usable key."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise JwksError("JWKS has no 'keys' array")
    if len(keys) > MAX_KEYS:
        raise JwksError(f"JWKS has {len(keys)} keys (max {MAX_KEYS})")
    loaded: list[VerificationKey] = []
    skipped: list[str] = []
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            skipped.append(f"key {index}: not an object")
            continue
        try:
            loaded.append(load_jwk(jwk))
        except (ValueError, TypeError, OverflowError) as exc:
            skipped.append(f"key {index}: {exc}")
    if not loaded:
        raise JwksError(
            "JWKS holds no usable signing key" + (f" ({skipped[0]})" if skipped else "")
        )
    return build_key_set(loaded, skipped)


def build_key_set(keys: Iterable[VerificationKey], skipped: Iterable[str] = ()) -> KeySet:
    """Index keys by kid; a repeated identical key is kept once."""
    by_kid: dict[str, list[VerificationKey]] = {}
    without_kid: list[VerificationKey] = []
    seen: set[str] = set()
    for key in keys:
        if key.fingerprint in seen:
            continue
        seen.add(key.fingerprint)
        if key.kid is None:
            without_kid.append(key)
        else:
            by_kid.setdefault(key.kid, []).append(key)
    return KeySet(
        by_kid={kid: tuple(v) for kid, v in by_kid.items()},
        without_kid=tuple(without_kid),
        fingerprint=frozenset(seen),
        skipped=tuple(skipped),
    )


async def fetch_jwks(session: aiohttp.ClientSession, uri: str, timeout_seconds: float) -> KeySet:
    """GET a JWKS from the issuer's configured URI (never from a token header).

    No redirects, a total timeout, a size cap, strict JSON. Raises JwksError.
    """
    if not uri.startswith(("https://", "http://")):
        raise JwksError("jwks_uri is not http(s)")
    try:
        async with session.get(
            uri,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            headers={"Accept": "application/json"},
        ) as response:
            if response.status != 200:
                raise JwksError(f"HTTP {response.status}")
            body = await response.content.read(MAX_JWKS_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise JwksError(f"fetch failed: {type(exc).__name__}") from None
    if len(body) > MAX_JWKS_BYTES:
        raise JwksError("JWKS too large")
    try:
        document = decode_json_object(body)
    except ValueError as exc:
        raise JwksError(f"bad JSON: {exc}") from None
    return load_jwks(document)
