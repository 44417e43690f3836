"""Bearer token verification without I/O: a token and an issuer's keys -> verified, or why not.

Strict and fail closed: a JWS from a configured issuer, checked with that issuer's
key set only (never a key the token points at), allowed algorithms only, claims
checked against the issuer's audiences, skew and lifetime cap. Nothing here awaits
or fetches: when the key set has no key for the token's `kid`, `verify` answers
`NO_KEY_FOR_KID` and the caller decides whether a (rate-limited) refresh may help.
"""

from __future__ import annotations

from dataclasses import dataclass

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Reason
from nhigate.proxy.jwks import KeySet
from nhigate.proxy.tokens import (
    SUPPORTED_ALGORITHMS,
    ParsedToken,
    TokenError,
    ValidatedToken,
    parse_token,
    validate_claims,
    verify_signature,
)

MAX_KEYS_TRIED = 4
"""A token without `kid` is tried against at most this many keys (bounds CPU per request)."""


@dataclass(frozen=True, slots=True)
class AuthnFailure:
    """Why a credential was refused. `detail` is short and safe to log (never the token)."""

    reason: Reason
    detail: str


NO_KEY_FOR_KID = AuthnFailure(Reason.UNKNOWN_KEY, "no key for this kid")
"""`verify`'s answer when no key of the set carries the token's kid (or, without a kid, none
accepts its alg): the one answer a key refresh can change. Compared by identity."""
_BAD_SIGNATURE = AuthnFailure(Reason.TOKEN_INVALID, "signature verification failed")
_UNSUPPORTED = AuthnFailure(Reason.ALGORITHM_NOT_ALLOWED, "algorithm not supported")
_NO_ISS = AuthnFailure(Reason.UNKNOWN_ISSUER, "missing or non-string iss")


def read_token(token: str) -> ParsedToken | AuthnFailure:
    """The checks that need no issuer: JWS structure, a supported `alg`, a string `iss`."""
    try:
        parsed = parse_token(token)
    except TokenError as exc:
        return AuthnFailure(exc.reason, exc.detail)
    if parsed.alg not in SUPPORTED_ALGORITHMS:
        # `none` in any case, HS* (HMAC with a public key as secret) and anything unknown.
        return _UNSUPPORTED
    if not isinstance(parsed.claims.get("iss"), str):
        return _NO_ISS
    return parsed


def verify(
    parsed: ParsedToken, config: IssuerConfig, keys: KeySet, now: float
) -> ValidatedToken | AuthnFailure:
    """Check `parsed` against one issuer: its algorithms, its `keys`, then its claims at `now`."""
    alg, kid = parsed.alg, parsed.kid
    if alg not in config.algorithms:
        return AuthnFailure(Reason.ALGORITHM_NOT_ALLOWED, f"{alg} not allowed for this issuer")
    candidates = keys.candidates(kid, alg)
    if not candidates:
        if kid is not None and keys.has_kid(kid):
            # (never echo the kid: it is attacker-controlled text)
            return AuthnFailure(Reason.ALGORITHM_NOT_ALLOWED, f"{alg} does not fit the kid's key")
        return NO_KEY_FOR_KID
    for key in candidates[:MAX_KEYS_TRIED]:
        if verify_signature(key.key, alg, parsed.signing_input, parsed.signature):
            break
    else:
        return _BAD_SIGNATURE
    try:
        return validate_claims(parsed.claims, config, now)
    except TokenError as exc:
        return AuthnFailure(exc.reason, exc.detail)
