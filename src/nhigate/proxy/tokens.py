"""A lean, strict JWS compact parser and signature verifier.

Only what the proxy needs: compact serialisation, asymmetric algorithms
(RS*, PS*, ES*, EdDSA), and a parser that rejects anything ambiguous instead
of guessing: non-canonical base64url, duplicate JSON keys, non-object JSON,
`crit` and `cty` headers. The result of parsing is *unverified*; nothing in it
may be trusted until `verify_signature` has passed with a key chosen by the
caller (never by the token).
"""

from __future__ import annotations

import binascii
import math
import re
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import (
    Identity,
    Reason,
    ServiceAccountRef,
    service_account_subject,
    token_identity,
)
from nhigate.policy.strict_json import STRICT_DECODER

MAX_TOKEN_BYTES = 8 * 1024
"""Longest accepted token (the compact serialisation, in bytes)."""

SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Asymmetric JWS algorithms the verifier implements. No HMAC, never `none`."""

_MAX_NESTING = 16

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class TokenError(Exception):
    """A token was rejected; `reason` is the audit reason, `detail` is safe to log."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A syntactically valid, *unverified* JWS."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        """The header's `alg` (a str; `parse_token` guarantees it)."""
        alg: str = self.header["alg"]
        return alg

    @property
    def kid(self) -> str | None:
        """The header's `kid`, when present (a str; `parse_token` guarantees it)."""
        kid: str | None = self.header.get("kid")
        return kid


def b64url_decode(segment: str) -> bytes:
    """Strict base64url: URL-safe alphabet, no padding, no whitespace, canonical trailing bits.

    Raises ValueError otherwise. Canonical form is checked by re-encoding, so
    two different strings can never decode to the same bytes.
    """
    if len(segment) % 4 == 1:
        raise ValueError("impossible base64url length")
    try:
        raw = urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid base64url") from exc
    if urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise ValueError("non-canonical base64url")
    return raw


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > _MAX_NESTING:
        raise ValueError("nesting too deep")
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, dict | list):
                _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list):
                _check_depth(item, depth + 1)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """Strict JSON object from UTF-8 bytes.

    orjson validates first (UTF-8 without BOM, no lone surrogates, which would
    break audit output, no NaN/Infinity or overflowing numbers, no trailing
    data); the policy layer's strict decoder (`nhigate.policy.strict_json`) then
    parses the same text, refusing duplicate keys at any depth. Nesting is capped
    at 16 levels.
    """
    try:
        orjson.loads(raw)
        value = STRICT_DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeError are ValueErrors
        raise ValueError(str(exc)[:80] or type(exc).__name__) from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    _check_depth(value)
    return value


def parse_token(token: str) -> ParsedToken:
    """Split and decode a compact JWS without verifying it. Raises TokenError(TOKEN_MALFORMED).

    Header rules: `alg` must be a string; `kid`, when present, a string; `crit`
    (unknown critical extensions) and `cty` (nested JWTs / other payloads) are
    rejected. Key-location headers (`jku`, `x5u`, `jwk`, `x5c`) are ignored by
    design: keys come only from the issuer's configured JWKS.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(Reason.TOKEN_MALFORMED, "token too large")
    if not token.isascii():
        raise TokenError(Reason.TOKEN_MALFORMED, "token is not ASCII")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError(Reason.TOKEN_MALFORMED, "not a compact JWS (expected 3 segments)")
    header_b64, payload_b64, signature_b64 = parts
    if not header_b64 or not payload_b64:
        # An empty signature is well-formed (`alg: none` tokens have one); it never verifies.
        raise TokenError(Reason.TOKEN_MALFORMED, "empty segment")
    try:
        header = decode_json_object(b64url_decode(header_b64))
    except ValueError as exc:
        raise TokenError(Reason.TOKEN_MALFORMED, f"bad header: {exc}") from None
    try:
        claims = decode_json_object(b64url_decode(payload_b64))
    except ValueError as exc:
        raise TokenError(Reason.TOKEN_MALFORMED, f"bad payload: {exc}") from None
    try:
        signature = b64url_decode(signature_b64)
    except ValueError as exc:
        raise TokenError(Reason.TOKEN_MALFORMED, f"bad signature encoding: {exc}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise TokenError(Reason.TOKEN_MALFORMED, "missing or non-string alg")
    if "crit" in header:
        raise TokenError(Reason.TOKEN_MALFORMED, "crit header not supported")
    if "cty" in header:
        raise TokenError(Reason.TOKEN_MALFORMED, "cty header (nested or non-JWT payload) rejected")
    if "enc" in header or "zip" in header:
        raise TokenError(Reason.TOKEN_MALFORMED, "JWE headers rejected")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError(Reason.TOKEN_MALFORMED, "non-string kid")
    signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
    return ParsedToken(
        header=header, claims=claims, signing_input=signing_input, signature=signature
    )


# --- signatures -------------------------------------------------------------------------------

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "256": hashes.SHA256(),
    "384": hashes.SHA384(),
    "512": hashes.SHA512(),
}
_EC_ALG_CURVE: dict[str, tuple[str, int]] = {
    "ES256": ("secp256r1", 32),
    "ES384": ("secp384r1", 48),
    "ES512": ("secp521r1", 66),
}
_PKCS1 = padding.PKCS1v15()
_PSS = {
    bits: padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.DIGEST_LENGTH)
    for bits, digest in _HASHES.items()
}


def key_matches_alg(key: PublicKey, alg: str) -> bool:
    """True when `alg` is a valid algorithm for this key type and curve (no cross-type use)."""
    if alg not in SUPPORTED_ALGORITHMS:
        return False
    if isinstance(key, rsa.RSAPublicKey):
        return alg[:2] in ("RS", "PS")
    if isinstance(key, ec.EllipticCurvePublicKey):
        expected = _EC_ALG_CURVE.get(alg)
        return expected is not None and key.curve.name == expected[0]
    return alg == "EdDSA"


def verify_signature(key: PublicKey, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """Check a JWS signature with `cryptography`. Never raises for bad input; returns False."""
    if not key_matches_alg(key, alg):
        return False
    try:
        if isinstance(key, rsa.RSAPublicKey):
            digest = _HASHES[alg[2:]]
            pad = _PSS[alg[2:]] if alg[0] == "P" else _PKCS1
            if len(signature) != (key.key_size + 7) // 8:
                return False
            key.verify(signature, signing_input, pad, digest)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            size = _EC_ALG_CURVE[alg][1]
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            if r == 0 or s == 0:
                return False
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(_HASHES[alg[2:]]))
        else:
            key.verify(signature, signing_input)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- claims (after the signature is verified) -------------------------------------------------

MAX_TIMESTAMP = 253_402_300_799
"""9999-12-31T23:59:59Z: numeric dates beyond this are nonsense, not "never expires"."""
MAX_SUBJECT_LENGTH = 1024
MAX_AUDIENCES = 64

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class ValidatedToken:
    """A verified token's identity and the clock window in which it may be served from cache."""

    identity: Identity
    not_before: float
    """Earliest time (skew applied) at which the token is acceptable."""
    expires_at: float
    """Time (skew applied) from which the token is expired."""


def _numeric_date(claims: dict[str, Any], name: str, *, required: bool) -> float | None:
    if name not in claims:
        if required:
            raise TokenError(Reason.TOKEN_INVALID, f"missing {name} claim")
        return None
    value = claims[name]
    # bool is an int subclass: `"exp": true` must not mean 1970-01-01T00:00:01.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(Reason.TOKEN_INVALID, f"{name} is not a number")
    if not math.isfinite(value) or not 0 <= value <= MAX_TIMESTAMP:
        raise TokenError(Reason.TOKEN_INVALID, f"{name} out of range")
    return float(value)


def _required_date(claims: dict[str, Any], name: str) -> float:
    value = _numeric_date(claims, name, required=True)
    if value is None:  # unreachable: required=True raises instead
        raise TokenError(Reason.TOKEN_INVALID, f"missing {name} claim")
    return value


def audiences(claims: Mapping[str, Any]) -> frozenset[str]:
    """The token's `aud` as a set; TokenError when missing or not a string or string list."""
    aud = claims.get("aud")
    if aud is None:
        raise TokenError(Reason.AUDIENCE_MISMATCH, "missing aud claim")
    if isinstance(aud, str):
        return frozenset((aud,))
    if (
        isinstance(aud, list)
        and 0 < len(aud) <= MAX_AUDIENCES
        and all(isinstance(a, str) for a in aud)
    ):
        return frozenset(aud)
    raise TokenError(Reason.TOKEN_INVALID, "aud is not a string or a list of strings")


def _optional_str(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SUBJECT_LENGTH:
        raise TokenError(Reason.TOKEN_INVALID, f"{name} is not a non-empty string")
    return value


def _service_account(claims: dict[str, Any], subject: str) -> ServiceAccountRef:
    """The service account named by a Kubernetes token; `sub` and `kubernetes.io` must agree."""
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise TokenError(Reason.TOKEN_INVALID, "missing kubernetes.io claim")
    namespace = k8s.get("namespace")
    account = k8s.get("serviceaccount")
    if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
        raise TokenError(Reason.TOKEN_INVALID, "bad kubernetes.io namespace")
    if not isinstance(account, dict):
        raise TokenError(Reason.TOKEN_INVALID, "missing kubernetes.io serviceaccount")
    name = account.get("name")
    uid = account.get("uid")
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.fullmatch(name):
        raise TokenError(Reason.TOKEN_INVALID, "bad kubernetes.io serviceaccount name")
    if uid is not None and (not isinstance(uid, str) or not uid or len(uid) > 64):
        raise TokenError(Reason.TOKEN_INVALID, "bad kubernetes.io serviceaccount uid")
    pod = k8s.get("pod")
    if pod is not None and (not isinstance(pod, dict) or not isinstance(pod.get("name"), str)):
        raise TokenError(Reason.TOKEN_INVALID, "bad kubernetes.io pod")
    pod_uid = None if pod is None else pod.get("uid")
    if pod_uid is not None and (not isinstance(pod_uid, str) or not pod_uid or len(pod_uid) > 64):
        raise TokenError(Reason.TOKEN_INVALID, "bad kubernetes.io pod uid")
    if subject != service_account_subject(namespace, name):
        raise TokenError(Reason.TOKEN_INVALID, "sub disagrees with kubernetes.io claim")
    return ServiceAccountRef(namespace=namespace, name=name, uid=uid, pod_uid=pod_uid)


MAX_ACTOR_CHAIN = 16
"""Deepest RFC 8693 `act` nesting read from a token; deeper tokens are invalid (grants
accept at most 8, see `Delegation.max_depth`)."""


def actor_chain(claims: dict[str, Any]) -> tuple[str, ...]:
    """The RFC 8693 actor chain of a token: `act.sub`, then the nested `act.act.sub`, ...

    The current actor comes first. Raises TokenError (`token_invalid`) when `act` (at any
    depth) is not an object with a non-empty string `sub`, or nests deeper than
    `MAX_ACTOR_CHAIN`.
    """
    if "act" not in claims:
        return ()
    chain: list[str] = []
    holder: dict[str, Any] = claims
    while "act" in holder:
        act = holder["act"]
        if not isinstance(act, dict):
            raise TokenError(Reason.TOKEN_INVALID, "act claim is not an object")
        sub = act.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 1024:
            raise TokenError(Reason.TOKEN_INVALID, "act claim without a string sub")
        chain.append(sub)
        if len(chain) > MAX_ACTOR_CHAIN:
            raise TokenError(Reason.TOKEN_INVALID, f"act chain deeper than {MAX_ACTOR_CHAIN}")
        holder = act
    return tuple(chain)


def validate_claims(claims: dict[str, Any], issuer: IssuerConfig, now: float) -> ValidatedToken:
    """Check the time window, lifetime cap, audience, subject (and Kubernetes binding).

    Raises TokenError with the audit reason. Call only after the signature has
    been verified with a key of `issuer`.
    """
    skew = float(issuer.clock_skew_seconds)
    exp = _required_date(claims, "exp")
    iat = _required_date(claims, "iat")
    nbf = _numeric_date(claims, "nbf", required=False)
    if exp <= iat:
        raise TokenError(Reason.TOKEN_INVALID, "exp is not after iat")
    if exp - iat > issuer.max_token_lifetime_seconds:
        raise TokenError(Reason.TOKEN_LIFETIME_EXCEEDED, "exp - iat exceeds the issuer's cap")
    expires_at = exp + skew
    not_before = max(iat, nbf if nbf is not None else iat) - skew
    if now >= expires_at:
        raise TokenError(Reason.TOKEN_EXPIRED, "token expired")
    if now < not_before:
        raise TokenError(Reason.TOKEN_NOT_YET_VALID, "token not yet valid (nbf/iat in the future)")
    if audiences(claims).isdisjoint(issuer.audiences):
        raise TokenError(Reason.AUDIENCE_MISMATCH, "aud does not name this service")
    subject = _optional_str(claims, "sub")
    if subject is None:
        raise TokenError(Reason.TOKEN_INVALID, "missing sub claim")
    token_id = _optional_str(claims, "jti")
    actors = actor_chain(claims)
    identity = token_identity(
        issuer.name,
        subject,
        MappingProxyType(claims),
        service_account=_service_account(claims, subject) if issuer.kubernetes else None,
        token_id=token_id,
        actors=actors,
        issued_at=iat,
    )
    return ValidatedToken(identity=identity, not_before=not_before, expires_at=expires_at)
