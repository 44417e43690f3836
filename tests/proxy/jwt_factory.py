"""Test helpers: real signing keys, JWK Sets, and signed or deliberately forged JWTs.

Independent of `nhigate.proxy.tokens` on purpose (signing goes straight to
`cryptography`), so the verifier is tested against a second implementation.
Import from test modules in tests/proxy as `from jwt_factory import ...`
(pytest puts this directory on sys.path; tests/proxy has no __init__.py).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, str, int]] = {
    "ES256": (ec.SECP256R1(), "P-256", 32),
    "ES384": (ec.SECP384R1(), "P-384", 48),
    "ES512": (ec.SECP521R1(), "P-521", 66),
}


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWS uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


@dataclass(frozen=True, slots=True)
class TestKey:
    """A private signing key with its kid, default alg and public JWK."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    kid: str
    alg: str
    private_key: PrivateKey
    public_jwk: dict[str, Any] = field(default_factory=dict)

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (what HMAC-confusion attacks use)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def make_signing_key(alg: str, kid: str | None = None, *, rsa_bits: int = 2048) -> TestKey:
    """A fresh key for `alg` (RS*/PS* -> RSA, ES* -> EC, EdDSA -> Ed25519) and its public JWK."""
    kid = kid if kid is not None else f"{alg.lower()}-{secrets.token_hex(4)}"
    jwk: dict[str, Any]
    private_key: PrivateKey
    if alg[:2] in ("RS", "PS"):
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        numbers = private_key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": _int_b64(numbers.n), "e": _int_b64(numbers.e)}
    elif alg in _EC_CURVES:
        curve, crv, size = _EC_CURVES[alg]
        private_key = ec.generate_private_key(curve)
        point = private_key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": crv, "x": _int_b64(point.x, size), "y": _int_b64(point.y, size)}
    elif alg == "EdDSA":
        private_key = ed25519.Ed25519PrivateKey.generate()
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    else:
        raise ValueError(f"unsupported test alg {alg!r}")
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return TestKey(kid=kid, alg=alg, private_key=private_key, public_jwk=jwk)


def jwks_for(*keys: TestKey) -> dict[str, Any]:
    """A JWK Set (`{"keys": [...]}`) holding the public JWKs of `keys`."""
    return {"keys": [dict(key.public_jwk) for key in keys]}


def signature_for(key: TestKey, signing_input: bytes, alg: str | None = None) -> bytes:
    """The raw JWS signature of `signing_input` with `key` under `alg` (default: the key's)."""
    alg = alg or key.alg
    pk = key.private_key
    if isinstance(pk, rsa.RSAPrivateKey):
        digest = _HASHES[alg[2:]]()
        pad: padding.AsymmetricPadding
        if alg.startswith("PS"):
            pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.DIGEST_LENGTH)
        else:
            pad = padding.PKCS1v15()
        return pk.sign(signing_input, pad, digest)
    if isinstance(pk, ec.EllipticCurvePrivateKey):
        _, _, size = _EC_CURVES[alg]
        der = pk.sign(signing_input, ec.ECDSA(_HASHES[alg[2:]]()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return pk.sign(signing_input)


def encode_segments(header: dict[str, Any] | str, payload: dict[str, Any] | str) -> str:
    """`b64(header).b64(payload)`; str arguments are used as raw JSON text (for duplicate keys)."""
    header_json = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    payload_json = (
        payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    )
    return f"{b64url(header_json.encode())}.{b64url(payload_json.encode())}"


def sign(
    key: TestKey,
    claims: dict[str, Any] | str,
    headers: dict[str, Any] | None = None,
    *,
    raw_header: str | None = None,
) -> str:
    """A compact JWS signed with `key`.

    The header is `{"alg": key.alg, "typ": "JWT", "kid": key.kid}` updated with
    `headers` (a value of None removes that header); `raw_header` replaces it
    with literal JSON text. `claims` may be literal JSON text too. The signature
    algorithm follows the header's `alg` when the key supports it.
    """
    header: dict[str, Any] = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
    for name, value in (headers or {}).items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    signing_input = encode_segments(raw_header if raw_header is not None else header, claims)
    alg = header.get("alg")
    sig_alg = alg if isinstance(alg, str) and _key_supports(key, alg) else key.alg
    signature = signature_for(key, signing_input.encode("ascii"), sig_alg)
    return f"{signing_input}.{b64url(signature)}"


def _key_supports(key: TestKey, alg: str) -> bool:
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        return alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    return alg == key.alg


def claims_for(
    iss: str,
    aud: str | list[str],
    sub: str = "ci-deployer",
    *,
    now: float | None = None,
    lifetime: int = 300,
    **extra: Any,
) -> dict[str, Any]:
    """Typical valid claims: iss, aud, sub, iat=now, exp=now+lifetime, jti, plus `extra`."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "sub": sub,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": secrets.token_hex(8),
    }
    claims.update(extra)
    return claims


def kubernetes_claims(
    iss: str,
    aud: str | list[str],
    namespace: str,
    name: str,
    uid: str = "3f0c2a4e-6f3c-4b1e-9d3e-0a1b2c3d4e5f",
    *,
    pod: str | None = "worker-7d9f",
    now: float | None = None,
    lifetime: int = 600,
) -> dict[str, Any]:
    """Claims shaped like a projected Kubernetes service-account token."""
    k8s: dict[str, Any] = {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}}
    if pod is not None:
        k8s["pod"] = {"name": pod, "uid": "9a8b7c6d-0000-4000-8000-000000000001"}
    claims = claims_for(
        iss, aud, f"system:serviceaccount:{namespace}:{name}", now=now, lifetime=lifetime
    )
    claims["kubernetes.io"] = k8s
    claims.pop("jti")
    return claims


def hmac_token(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An HS256/384/512 token keyed with `secret` (for algorithm-confusion attacks)."""
    import hmac as _hmac

    signing_input = encode_segments(header, claims)
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}[str(header["alg"])]
    mac = _hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{b64url(mac)}"


class FakeClock:
    """A settable epoch clock for `Authenticator(clock=...)`."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(now if now is not None else int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (or back, with a negative value)."""
        self.now += seconds


class JwksServer:
    """A real JWKS endpoint on 127.0.0.1 (aiohttp), with knobs for outages and slowness.

    `async with JwksServer(jwks) as server:` then use `server.uri`; set
    `server.jwks`, `server.status` (e.g. 503), `server.delay` (seconds) or
    `server.body` (raw bytes overriding the JSON) at any time; `server.hits`
    counts requests to the JWKS path, `server.other_hits` every other path.
    """

    def __init__(self, jwks: dict[str, Any] | None = None) -> None:
        self.jwks: dict[str, Any] = jwks if jwks is not None else {"keys": []}
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None
        self.hits = 0
        self.other_hits = 0
        self.uri = ""
        self.base = ""
        self._runner: Any = None

    async def __aenter__(self) -> JwksServer:
        import asyncio

        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path != "/jwks.json":
                self.other_hits += 1
                return web.Response(status=404)
            self.hits += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.status != 200:
                return web.Response(status=self.status, text="unavailable")
            body = self.body if self.body is not None else json.dumps(self.jwks).encode()
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self.uri = f"{self.base}/jwks.json"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
