"""Identity assertions: short-lived ES256 JWTs the proxy signs and sends upstream.

The backend verifies them with the proxy's public JWKS (`public_jwks()`,
served on the admin port and published in a ConfigMap) to know a request came
through the proxy, for whom, and under which grant. Signing costs ~40 µs, so
an assertion is reused per (identity, grant, audience, ttl) while more than
half of its lifetime remains; reused assertions share their `jti`.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from nhigate.jose import b64url, compact_json, load_p256_private_key, p256_signing_jwk
from nhigate.policy.model import Identity

ASSERTION_ISSUER = "nhigate-proxy"
_CACHE_SIZE = 4096
_CacheKey = tuple[str, str, str, str | None, str, int]


class AssertionSigner:
    """Signs identity assertions with one EC P-256 key."""

    def __init__(self, private_key_pem: bytes | None = None) -> None:
        """Load an EC P-256 private key (PEM, unencrypted), or generate one when None."""
        if private_key_pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = load_p256_private_key(private_key_pem)
        self._key = key
        self._jwk = p256_signing_jwk(key)
        self.kid = self._jwk["kid"]
        header = {"alg": "ES256", "typ": "JWT", "kid": self.kid}
        self._header_b64 = b64url(compact_json(header))
        self._cache: OrderedDict[_CacheKey, tuple[str, float]] = OrderedDict()

    def public_jwks(self) -> dict[str, object]:
        """The public JWK Set backends use to verify assertions."""
        return {"keys": [dict(self._jwk)]}

    def sign(
        self, identity: Identity, grant: str | None, audience: str, ttl: float, now: float
    ) -> str:
        """An assertion for `identity` allowed by `grant`, valid from `now` for `ttl` seconds.

        Claims: iss "nhigate-proxy", sub, kind, idp (the IdentityIssuer name),
        grant, aud (when non-empty), jti, iat, exp.
        """
        key: _CacheKey = (
            identity.kind.value,
            identity.issuer,
            identity.subject,
            grant,
            audience,
            int(ttl),
        )
        cached = self._cache.get(key)
        if cached is not None:
            token, exp = cached
            if now < exp - ttl / 2:
                self._cache.move_to_end(key)
                return token
            del self._cache[key]
        iat = int(now)
        exp_time = iat + max(1, int(ttl))
        claims: dict[str, object] = {
            "iss": ASSERTION_ISSUER,
            "sub": identity.subject,
            "kind": identity.kind.value,
            "idp": identity.issuer,
            "grant": grant,
            "jti": secrets.token_urlsafe(12),
            "iat": iat,
            "exp": exp_time,
        }
        if audience:
            claims["aud"] = audience
        signing_input = f"{self._header_b64}.{b64url(compact_json(claims))}"
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        token = f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.popitem(last=False)
        self._cache[key] = (token, float(exp_time))
        return token
