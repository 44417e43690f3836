"""The token attack matrix: every JWT misuse we can name, each with the exact reason it fails.

Data-driven: each case builds an `Authorization` header from real keys (the
issuer's, or an attacker's) and names the `Reason` the Authenticator must
return. A JWKS server on 127.0.0.1 records any request, to prove that key
location headers (`jku`, `x5u`) are never followed. After the whole matrix a
valid token still authenticates.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from jwt_factory import (
    FakeClock,
    JwksServer,
    TestKey,
    b64url,
    claims_for,
    encode_segments,
    hmac_token,
    jwks_for,
    make_signing_key,
    sign,
    signature_for,
)

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, Reason
from nhigate.proxy.authn import Authenticator, AuthnFailure

ISS = "https://issuer.example"
AUD = "payments-api"
NOW = 1_800_000_000.0


@dataclass(frozen=True)
class Keys:
    rsa: TestKey
    ec: TestKey
    ed: TestKey
    attacker_rsa: TestKey
    attacker_ec: TestKey
    jku_base: str


@pytest.fixture(scope="module")
def keyring() -> dict[str, TestKey]:
    return {
        "rsa": make_signing_key("RS256", "rsa-1"),
        "ec": make_signing_key("ES256", "ec-1"),
        "ed": make_signing_key("EdDSA", "ed-1"),
        "attacker_rsa": make_signing_key("RS256", "evil-rsa"),
        "attacker_ec": make_signing_key("ES256", "evil-ec"),
    }


@pytest.fixture
async def recorder() -> AsyncIterator[JwksServer]:
    """Serves the *attacker's* keys; any request to it is a failure of the verifier."""
    async with JwksServer() as server:
        yield server


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at NOW, with `overrides` applied (a value of ... deletes the claim)."""
    base = claims_for(ISS, AUD, now=NOW, lifetime=600)
    for name, value in overrides.items():
        if value is ...:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def bearer(token: str) -> str:
    return f"Bearer {token}"


def flip_last_char(segment: str) -> str:
    """A different base64url string that decodes to the same bytes (non-canonical trailing bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) ^ 1]


def with_segment(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def unsigned(header: dict[str, Any] | str, payload: dict[str, Any] | str, sig: str = "") -> str:
    return f"{encode_segments(header, payload)}.{sig}"


def raw_token(header: bytes, payload: bytes, key: TestKey) -> str:
    """Sign arbitrary header/payload bytes (invalid UTF-8, odd JSON) with a real key."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    return f"{signing_input}.{b64url(signature_for(key, signing_input.encode()))}"


Build = Callable[[dict[str, TestKey], JwksServer], str | None]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    expected: Reason | None  # None: must authenticate


def _rsa(k: dict[str, TestKey], _: JwksServer) -> TestKey:
    return k["rsa"]


def _alg_none(alg: str) -> Build:
    return lambda k, s: bearer(unsigned({"alg": alg, "kid": "rsa-1"}, claims()))


def _hmac_with_public_pem(alg: str) -> Build:
    return lambda k, s: bearer(
        hmac_token(k["rsa"].public_pem(), {"alg": alg, "kid": "rsa-1"}, claims())
    )


def _attacker_with_kid(kid: str) -> Build:
    return lambda k, s: bearer(sign(k["attacker_rsa"], claims(), {"kid": kid}))


def _other_key(signer: str, victim_kid: str) -> Build:
    return lambda k, s: bearer(sign(k[signer], claims(), {"kid": victim_kid}))


def _short_signature(token: str) -> str:
    sig = token.split(".")[2]
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    return with_segment(token, 2, b64url(raw[:-3]))


def _non_canonical_signature(token: str) -> str:
    sig = token.split(".")[2]
    assert len(sig) % 4 != 0  # 256-byte RSA signature: the last char carries unused bits
    return with_segment(token, 2, flip_last_char(sig))


def _pss_as_pkcs1(key: TestKey) -> str:
    body = claims()
    pkcs1 = sign(key, body)
    pss = sign(key, body, {"alg": "PS256"})
    return with_segment(pkcs1, 2, pss.split(".")[2])


def _der_es256(key: TestKey) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    signing_input = encode_segments({"alg": "ES256", "kid": key.kid}, claims())
    private = key.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    der = private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{signing_input}.{b64url(der)}"


def _padded_payload(key: TestKey) -> str:
    for extra in range(4):  # find a payload whose base64 needs padding
        token = sign(key, claims(p="x" * extra))
        header, payload, sig = token.split(".")
        if len(payload) % 4:
            return f"{header}.{payload}{'=' * (-len(payload) % 4)}.{sig}"
    raise AssertionError("unreachable")


def _standard_alphabet(key: TestKey) -> str:
    for extra in range(64):  # find a token whose signature uses - or _
        token = sign(key, claims(p="x" * extra))
        header, payload, sig = token.split(".")
        if "-" in sig or "_" in sig:
            raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
            return f"{header}.{payload}.{base64.b64encode(raw).decode().rstrip('=')}"
    raise AssertionError("unreachable")


CASES: list[Case] = [
    # --- the credential itself ---------------------------------------------------------------
    Case("no header", lambda k, s: None, Reason.CREDENTIAL_MISSING),
    Case("basic scheme", lambda k, s: "Basic dXNlcjpwYXNz", Reason.CREDENTIAL_MISSING),
    Case(
        "token without scheme",
        lambda k, s: sign(k["rsa"], claims()),
        Reason.CREDENTIAL_MISSING,
    ),
    Case("bearer without token", lambda k, s: "Bearer", Reason.TOKEN_MALFORMED),
    Case("bearer blank", lambda k, s: "Bearer    ", Reason.TOKEN_MALFORMED),
    Case(
        "two tokens",
        lambda k, s: f"Bearer {sign(k['rsa'], claims())} {sign(k['ec'], claims())}",
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "10 KB token",
        lambda k, s: bearer(sign(k["rsa"], claims(pad="x" * 10_000))),
        Reason.TOKEN_MALFORMED,
    ),
    Case("1 MB header", lambda k, s: "Bearer " + "a" * 1_000_000, Reason.TOKEN_MALFORMED),
    Case(
        "non-ASCII appended",
        lambda k, s: bearer(sign(k["rsa"], claims()) + "é"),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "non-ASCII lookalike dot",
        lambda k, s: bearer(sign(k["rsa"], claims()).replace(".", "\u2024", 1)),
        Reason.TOKEN_MALFORMED,
    ),
    Case("truncated to header", lambda k, s: "Bearer eyJhbGciOi", Reason.TOKEN_MALFORMED),
    Case(
        "truncated: two segments",
        lambda k, s: bearer(sign(k["rsa"], claims()).rsplit(".", 1)[0]),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "truncated: empty signature",
        lambda k, s: bearer(sign(k["rsa"], claims()).rsplit(".", 1)[0] + "."),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "truncated: signature short by 3 bytes",
        lambda k, s: bearer(_short_signature(sign(k["rsa"], claims()))),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "JWE-shaped (5 segments)",
        lambda k, s: bearer(sign(k["rsa"], claims()) + ".AAAA.BBBB"),
        Reason.TOKEN_MALFORMED,
    ),
    # --- alg: none and HMAC confusion --------------------------------------------------------
    *[
        Case(
            f"alg {alg!r} unsigned",
            _alg_none(alg),
            Reason.ALGORITHM_NOT_ALLOWED,
        )
        for alg in ("none", "None", "NONE", "nOnE")
    ],
    Case(
        "alg none with a copied valid signature",
        lambda k, s: bearer(
            with_segment(
                unsigned({"alg": "none", "kid": "rsa-1"}, claims(), "x"),
                2,
                sign(k["rsa"], claims()).split(".")[2],
            )
        ),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    *[
        Case(
            f"{alg} keyed with the RSA public key PEM",
            _hmac_with_public_pem(alg),
            Reason.ALGORITHM_NOT_ALLOWED,
        )
        for alg in ("HS256", "HS384", "HS512")
    ],
    Case(
        "HS256 keyed with the JWK n value",
        lambda k, s: bearer(
            hmac_token(
                str(k["rsa"].public_jwk["n"]).encode(), {"alg": "HS256", "kid": "rsa-1"}, claims()
            )
        ),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    Case(
        "alg not allowed for issuer (RS512)",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"alg": "RS512"})),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    Case(
        "PS256 with an RSA key when only RS256 allowed",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"alg": "PS256"})),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    Case(
        "ES256 header on the RSA key's kid",
        lambda k, s: bearer(sign(k["attacker_ec"], claims(), {"kid": "rsa-1"})),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    Case(
        "EdDSA header on the EC key's kid",
        lambda k, s: bearer(sign(k["ed"], claims(), {"kid": "ec-1"})),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    Case(
        "made-up alg",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"alg": "RS256 "})),
        Reason.ALGORITHM_NOT_ALLOWED,
    ),
    Case(
        "alg is not a string",
        lambda k, s: bearer(unsigned({"alg": ["RS256"], "kid": "rsa-1"}, claims(), "AAAA")),
        Reason.TOKEN_MALFORMED,
    ),
    # --- key selection ----------------------------------------------------------------------
    *[
        Case(
            f"kid injection {kid!r}",
            _attacker_with_kid(kid),
            Reason.UNKNOWN_KEY,
        )
        for kid in (
            "../../../../etc/passwd",
            "/dev/null",
            "rsa-1/../rsa-1",
            "rsa-1\x00",
            "' OR '1'='1",
            "${jndi:ldap://127.0.0.1/x}",
            "",
            "RSA-1",
        )
    ],
    Case(
        "kid is a number",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"kid": 1})),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "jku to attacker JWKS, attacker kid",
        lambda k, s: bearer(sign(k["attacker_rsa"], claims(), {"jku": s.uri})),
        Reason.UNKNOWN_KEY,
    ),
    Case(
        "jku to attacker JWKS, issuer's kid",
        lambda k, s: bearer(sign(k["attacker_rsa"], claims(), {"jku": s.uri, "kid": "rsa-1"})),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "x5u to attacker",
        lambda k, s: bearer(
            sign(k["attacker_rsa"], claims(), {"x5u": s.base + "/cert.pem", "kid": "rsa-1"})
        ),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "embedded jwk header (attacker key)",
        lambda k, s: bearer(
            sign(k["attacker_rsa"], claims(), {"jwk": k["attacker_rsa"].public_jwk, "kid": "rsa-1"})
        ),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "embedded jwk header without kid",
        lambda k, s: bearer(
            sign(k["attacker_ec"], claims(), {"jwk": k["attacker_ec"].public_jwk, "kid": None})
        ),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "x5c header (garbage chain)",
        lambda k, s: bearer(sign(k["attacker_rsa"], claims(), {"x5c": ["MIIB"], "kid": "rsa-1"})),
        Reason.TOKEN_INVALID,
    ),
    *[
        Case(
            f"signature from another key ({alg})",
            _other_key(name, victim),
            Reason.TOKEN_INVALID,
        )
        for alg, name, victim in (
            ("RS256", "attacker_rsa", "rsa-1"),
            ("ES256", "attacker_ec", "ec-1"),
        )
    ],
    Case(
        "EdDSA signature from another key",
        lambda k, s: bearer(sign(make_signing_key("EdDSA", "ed-1"), claims())),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "claims swapped under a valid signature",
        lambda k, s: bearer(
            with_segment(
                sign(k["rsa"], claims()),
                1,
                encode_segments({}, claims(sub="admin")).split(".")[1],
            )
        ),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "ES256 signature in DER instead of r||s",
        lambda k, s: bearer(_der_es256(k["ec"])),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "ES256 zero signature",
        lambda k, s: bearer(with_segment(sign(k["ec"], claims()), 2, b64url(bytes(64)))),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "PS256 signature presented as RS256",
        lambda k, s: bearer(_pss_as_pkcs1(k["rsa"])),
        Reason.TOKEN_INVALID,
    ),
    # --- header extensions ------------------------------------------------------------------
    Case(
        "nested JWT (cty: JWT)",
        lambda k, s: bearer(
            raw_token(
                json.dumps({"alg": "RS256", "kid": "rsa-1", "cty": "JWT"}).encode(),
                sign(k["attacker_rsa"], claims()).encode(),
                k["rsa"],
            )
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "nested JWT (cty: JWT) with JSON claims",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"cty": "JWT"})),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "payload is a JWT string",
        lambda k, s: bearer(
            raw_token(
                json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode(),
                json.dumps(sign(k["attacker_rsa"], claims())).encode(),
                k["rsa"],
            )
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "crit header",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"crit": ["exp"], "exp": 1})),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "crit b64=false (unencoded payload)",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"crit": ["b64"], "b64": False})),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "JWE enc header",
        lambda k, s: bearer(sign(k["rsa"], claims(), {"enc": "A256GCM"})),
        Reason.TOKEN_MALFORMED,
    ),
    # --- JSON and base64 ---------------------------------------------------------------------
    Case(
        "duplicate sub in payload",
        lambda k, s: bearer(
            sign(
                k["rsa"],
                json.dumps(claims(sub="reader"))[:-1] + ',"sub":"admin"}',
            )
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "duplicate alg in header",
        lambda k, s: bearer(
            sign(k["rsa"], claims(), raw_header='{"alg":"RS256","kid":"rsa-1","alg":"none"}')
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "duplicate key in nested claim",
        lambda k, s: bearer(
            sign(k["rsa"], json.dumps(claims())[:-1] + ',"ext":{"role":"a","role":"b"}}')
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "header is a JSON array",
        lambda k, s: bearer(sign(k["rsa"], claims(), raw_header='["RS256"]')),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "payload is JSON null", lambda k, s: bearer(sign(k["rsa"], "null")), Reason.TOKEN_MALFORMED
    ),
    Case(
        "payload with NaN",
        lambda k, s: bearer(sign(k["rsa"], json.dumps(claims())[:-1] + ',"x":NaN}')),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "payload with 1e400",
        lambda k, s: bearer(sign(k["rsa"], json.dumps(claims())[:-1] + ',"x":1e400}')),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "lone surrogate in sub",
        lambda k, s: bearer(sign(k["rsa"], json.dumps(claims(sub=...))[:-1] + ',"sub":"\\ud800"}')),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "deeply nested payload",
        lambda k, s: bearer(
            sign(k["rsa"], json.dumps(claims())[:-1] + ',"x":' + "[" * 64 + "]" * 64 + "}")
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "invalid UTF-8 payload",
        lambda k, s: bearer(
            raw_token(b'{"alg":"RS256","kid":"rsa-1"}', b'{"sub":"\xff\xfe"}', k["rsa"])
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "UTF-16 payload",
        lambda k, s: bearer(
            raw_token(
                b'{"alg":"RS256","kid":"rsa-1"}', json.dumps(claims()).encode("utf-16"), k["rsa"]
            )
        ),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "non-canonical base64 signature (trailing bits)",
        lambda k, s: bearer(_non_canonical_signature(sign(k["rsa"], claims()))),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "padded base64 payload",
        lambda k, s: bearer(_padded_payload(k["rsa"])),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "standard (non-URL) base64 alphabet",
        lambda k, s: bearer(_standard_alphabet(k["rsa"])),
        Reason.TOKEN_MALFORMED,
    ),
    Case(
        "whitespace inside a segment",
        lambda k, s: bearer(sign(k["rsa"], claims()).replace(".", ".\t", 1)),
        Reason.TOKEN_MALFORMED,
    ),
    # --- issuer and audience ----------------------------------------------------------------
    Case(
        "wrong iss",
        lambda k, s: bearer(sign(k["rsa"], claims(iss="https://evil"))),
        Reason.UNKNOWN_ISSUER,
    ),
    Case(
        "iss with trailing slash",
        lambda k, s: bearer(sign(k["rsa"], claims(iss=ISS + "/"))),
        Reason.UNKNOWN_ISSUER,
    ),
    Case(
        "iss as list", lambda k, s: bearer(sign(k["rsa"], claims(iss=[ISS]))), Reason.UNKNOWN_ISSUER
    ),
    Case(
        "missing iss", lambda k, s: bearer(sign(k["rsa"], claims(iss=...))), Reason.UNKNOWN_ISSUER
    ),
    Case(
        "wrong aud",
        lambda k, s: bearer(sign(k["rsa"], claims(aud="other-api"))),
        Reason.AUDIENCE_MISMATCH,
    ),
    Case(
        "aud differs in case",
        lambda k, s: bearer(sign(k["rsa"], claims(aud=AUD.upper()))),
        Reason.AUDIENCE_MISMATCH,
    ),
    Case(
        "missing aud",
        lambda k, s: bearer(sign(k["rsa"], claims(aud=...))),
        Reason.AUDIENCE_MISMATCH,
    ),
    Case(
        "aud array without ours",
        lambda k, s: bearer(sign(k["rsa"], claims(aud=["a", "b"]))),
        Reason.AUDIENCE_MISMATCH,
    ),
    Case(
        "aud array with ours",
        lambda k, s: bearer(sign(k["rsa"], claims(aud=["a", AUD]))),
        None,
    ),
    Case(
        "aud empty array", lambda k, s: bearer(sign(k["rsa"], claims(aud=[]))), Reason.TOKEN_INVALID
    ),
    Case(
        "aud array with a non-string",
        lambda k, s: bearer(sign(k["rsa"], claims(aud=[AUD, 1]))),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "aud as object",
        lambda k, s: bearer(sign(k["rsa"], claims(aud={AUD: True}))),
        Reason.TOKEN_INVALID,
    ),
    # --- time ---------------------------------------------------------------------------------
    Case(
        "expired",
        lambda k, s: bearer(sign(k["rsa"], claims(iat=NOW - 700, exp=NOW - 100))),
        Reason.TOKEN_EXPIRED,
    ),
    Case(
        "expired within skew",
        lambda k, s: bearer(sign(k["rsa"], claims(iat=NOW - 700, exp=NOW - 10))),
        None,
    ),
    Case(
        "nbf in the future",
        lambda k, s: bearer(sign(k["rsa"], claims(nbf=NOW + 300))),
        Reason.TOKEN_NOT_YET_VALID,
    ),
    Case(
        "iat in the future",
        lambda k, s: bearer(sign(k["rsa"], claims(iat=NOW + 120, exp=NOW + 600))),
        Reason.TOKEN_NOT_YET_VALID,
    ),
    Case(
        "lifetime too long (2 h, cap 1 h)",
        lambda k, s: bearer(sign(k["rsa"], claims(iat=NOW, exp=NOW + 7200))),
        Reason.TOKEN_LIFETIME_EXCEEDED,
    ),
    Case(
        "huge exp (year 2286)",
        lambda k, s: bearer(sign(k["rsa"], claims(exp=9_999_999_999))),
        Reason.TOKEN_LIFETIME_EXCEEDED,
    ),
    Case(
        "huge exp (1e300)",
        lambda k, s: bearer(sign(k["rsa"], claims(exp=1e300))),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "huge exp (2**70)",
        lambda k, s: bearer(sign(k["rsa"], claims(exp=2**70))),
        Reason.TOKEN_INVALID,
    ),
    Case("negative iat", lambda k, s: bearer(sign(k["rsa"], claims(iat=-1))), Reason.TOKEN_INVALID),
    Case(
        "very negative iat",
        lambda k, s: bearer(sign(k["rsa"], claims(iat=-(10**15)))),
        Reason.TOKEN_INVALID,
    ),
    Case(
        "exp before iat",
        lambda k, s: bearer(sign(k["rsa"], claims(iat=NOW, exp=NOW - 1))),
        Reason.TOKEN_INVALID,
    ),
    Case("exp true", lambda k, s: bearer(sign(k["rsa"], claims(exp=True))), Reason.TOKEN_INVALID),
    Case(
        "exp as string",
        lambda k, s: bearer(sign(k["rsa"], claims(exp=str(int(NOW + 60))))),
        Reason.TOKEN_INVALID,
    ),
    Case("exp null", lambda k, s: bearer(sign(k["rsa"], claims(exp=None))), Reason.TOKEN_INVALID),
    Case(
        "nbf as string", lambda k, s: bearer(sign(k["rsa"], claims(nbf="0"))), Reason.TOKEN_INVALID
    ),
    Case("missing exp", lambda k, s: bearer(sign(k["rsa"], claims(exp=...))), Reason.TOKEN_INVALID),
    Case("missing iat", lambda k, s: bearer(sign(k["rsa"], claims(iat=...))), Reason.TOKEN_INVALID),
    # --- subject --------------------------------------------------------------------------------
    Case("missing sub", lambda k, s: bearer(sign(k["rsa"], claims(sub=...))), Reason.TOKEN_INVALID),
    Case("empty sub", lambda k, s: bearer(sign(k["rsa"], claims(sub=""))), Reason.TOKEN_INVALID),
    Case(
        "sub is a number", lambda k, s: bearer(sign(k["rsa"], claims(sub=42))), Reason.TOKEN_INVALID
    ),
    Case(
        "jti is a number", lambda k, s: bearer(sign(k["rsa"], claims(jti=7))), Reason.TOKEN_INVALID
    ),
    Case(
        "non-ASCII sub (valid UTF-8)",
        lambda k, s: bearer(sign(k["ed"], claims(sub="müller-büro"))),
        None,
    ),
    # --- the happy paths (the matrix must not reject everything) -------------------------------
    Case("valid RS256", lambda k, s: bearer(sign(k["rsa"], claims())), None),
    Case("valid ES256", lambda k, s: bearer(sign(k["ec"], claims())), None),
    Case("valid EdDSA", lambda k, s: bearer(sign(k["ed"], claims())), None),
    Case("lower-case scheme", lambda k, s: f"bearer {sign(k['rsa'], claims())}", None),
    Case(
        "valid ES256 without kid (one EC key fits)",
        lambda k, s: bearer(sign(k["ec"], claims(), {"kid": None})),
        None,
    ),
]


def issuer_config(keys: dict[str, TestKey]) -> IssuerConfig:
    return IssuerConfig(
        name="ci",
        issuer=ISS,
        audiences=(AUD, "other-service"),
        algorithms=("RS256", "ES256", "EdDSA"),
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=30,
        jwks=jwks_for(keys["rsa"], keys["ec"], keys["ed"]),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_token_attack(case: Case, keyring: dict[str, TestKey], recorder: JwksServer) -> None:
    recorder.jwks = jwks_for(keyring["attacker_rsa"], keyring["attacker_ec"])
    authenticator = Authenticator([issuer_config(keyring)], clock=FakeClock(NOW))
    header = case.build(keyring, recorder)
    try:
        first = await authenticator.authenticate(header)
        second = await authenticator.authenticate(header)  # the cache must not change the answer
    finally:
        await authenticator.close()
    if case.expected is None:
        assert isinstance(first, Identity), first
    else:
        assert isinstance(first, AuthnFailure), f"{case.name} was accepted: {first}"
        assert first.reason is case.expected, first
        if header:
            token = header.partition(" ")[2].strip()
            assert not token or token[:40] not in first.detail  # never log the token
    assert second == first
    assert recorder.hits == 0
    assert recorder.other_hits == 0, "a token-supplied URL was fetched"


async def test_matrix_leaves_authenticator_healthy(
    keyring: dict[str, TestKey], recorder: JwksServer
) -> None:
    """All attacks against one Authenticator, then a valid token still passes (and caches)."""
    authenticator = Authenticator([issuer_config(keyring)], clock=FakeClock(NOW))
    rejected = 0
    for case in CASES:
        result = await authenticator.authenticate(case.build(keyring, recorder))
        rejected += isinstance(result, AuthnFailure)
    assert rejected == sum(1 for c in CASES if c.expected is not None)
    valid = bearer(sign(keyring["ec"], claims()))
    assert isinstance(await authenticator.authenticate(valid), Identity)
    assert isinstance(await authenticator.authenticate(valid), Identity)
    assert authenticator.stats.cache_hits >= 1
    assert recorder.hits == 0
    await authenticator.close()


def test_matrix_is_large_enough() -> None:
    assert len([c for c in CASES if c.expected is not None]) >= 80
