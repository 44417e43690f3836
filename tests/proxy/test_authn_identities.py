"""Identity kinds beyond plain JWTs: Kubernetes service accounts, SPIFFE (mTLS), and the
identity assertions the proxy signs for backends."""

from __future__ import annotations

import datetime
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from jwt_factory import FakeClock, TestKey, jwks_for, kubernetes_claims, make_signing_key, sign

from nhigate.policy.document import IssuerConfig
from nhigate.policy.model import Identity, IdentityKind, Reason, ServiceAccountRef
from nhigate.proxy.assertion import AssertionSigner
from nhigate.proxy.authn import Authenticator, AuthnFailure
from nhigate.proxy.spiffe import is_spiffe_id, spiffe_id_from_peer_cert

K8S_ISS = "https://kubernetes.default.svc.cluster.local"
AUD = "nhigate:payments/payments-api"


@pytest.fixture(scope="module")
def sa_key() -> TestKey:
    return make_signing_key("RS256", "cluster-key")


def k8s_issuer(key: TestKey) -> IssuerConfig:
    return IssuerConfig(
        name="cluster",
        issuer=K8S_ISS,
        audiences=(AUD,),
        algorithms=("RS256",),
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=30,
        jwks=jwks_for(key),
        kubernetes=True,
    )


# --- Kubernetes service accounts -------------------------------------------------------------


async def test_service_account_token(sa_key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([k8s_issuer(sa_key)], clock=clock)
    claims = kubernetes_claims(K8S_ISS, [AUD], "ci", "deployer", uid="u-1", now=clock.now)
    result = await authn.authenticate("Bearer " + sign(sa_key, claims))
    assert isinstance(result, Identity)
    assert result.kind is IdentityKind.SERVICE_ACCOUNT
    assert result.issuer == "cluster"
    assert result.subject == "system:serviceaccount:ci:deployer"
    pod_uid = claims["kubernetes.io"]["pod"]["uid"]
    assert result.service_account == ServiceAccountRef("ci", "deployer", "u-1", pod_uid=pod_uid)
    assert result.issued_at == claims["iat"]  # judged against the live identities


async def test_service_account_token_without_pod(sa_key: TestKey) -> None:
    clock = FakeClock()
    authn = Authenticator([k8s_issuer(sa_key)], clock=clock)
    claims = kubernetes_claims(K8S_ISS, AUD, "ci", "deployer", pod=None, now=clock.now)
    assert isinstance(await authn.authenticate("Bearer " + sign(sa_key, claims)), Identity)


def _tamper(claims: dict[str, Any], how: str) -> None:
    k8s = claims["kubernetes.io"]
    if how == "sub names another namespace":
        claims["sub"] = "system:serviceaccount:kube-system:deployer"
    elif how == "sub names another account":
        claims["sub"] = "system:serviceaccount:ci:admin"
    elif how == "sub is not a service account":
        claims["sub"] = "deployer"
    elif how == "claim missing":
        del claims["kubernetes.io"]
    elif how == "namespace missing":
        del k8s["namespace"]
    elif how == "namespace not a DNS label":
        k8s["namespace"] = "ci:x"
        claims["sub"] = "system:serviceaccount:ci:x:deployer"
    elif how == "serviceaccount not an object":
        k8s["serviceaccount"] = "deployer"
    elif how == "uid not a string":
        k8s["serviceaccount"]["uid"] = 5
    elif how == "pod not an object":
        k8s["pod"] = "worker"
    elif how == "pod uid not a string":
        k8s["pod"]["uid"] = 7
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "sub names another namespace",
        "sub names another account",
        "sub is not a service account",
        "claim missing",
        "namespace missing",
        "namespace not a DNS label",
        "serviceaccount not an object",
        "uid not a string",
        "pod not an object",
        "pod uid not a string",
    ],
)
async def test_service_account_claims_must_agree(sa_key: TestKey, how: str) -> None:
    clock = FakeClock()
    authn = Authenticator([k8s_issuer(sa_key)], clock=clock)
    claims = kubernetes_claims(K8S_ISS, AUD, "ci", "deployer", now=clock.now)
    _tamper(claims, how)
    result = await authn.authenticate("Bearer " + sign(sa_key, claims))
    assert isinstance(result, AuthnFailure)
    assert result.reason is Reason.TOKEN_INVALID


async def test_legacy_secret_token_without_exp_is_rejected(sa_key: TestKey) -> None:
    legacy = {
        "iss": K8S_ISS,
        "sub": "system:serviceaccount:ci:deployer",
        "aud": AUD,
        "iat": int(FakeClock().now),
        "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "deployer"}},
    }
    result = await Authenticator([k8s_issuer(sa_key)]).authenticate(
        "Bearer " + sign(sa_key, legacy)
    )
    assert isinstance(result, AuthnFailure)
    assert result.reason is Reason.TOKEN_INVALID


async def test_same_keys_non_kubernetes_issuer_gives_jwt_kind(sa_key: TestKey) -> None:
    plain = IssuerConfig(
        name="plain",
        issuer=K8S_ISS,
        audiences=(AUD,),
        algorithms=("RS256",),
        max_token_lifetime_seconds=3600,
        clock_skew_seconds=30,
        jwks=jwks_for(sa_key),
    )
    clock = FakeClock()
    claims = kubernetes_claims(K8S_ISS, AUD, "ci", "deployer", now=clock.now)
    result = await Authenticator([plain], clock=clock).authenticate(
        "Bearer " + sign(sa_key, claims)
    )
    assert isinstance(result, Identity)
    assert result.kind is IdentityKind.JWT
    assert result.service_account is None


# --- SPIFFE -------------------------------------------------------------------------------------


def _cert(uris: list[str] | None, dns: list[str] | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svid")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris or []]
    names += [x509.DNSName(d) for d in dns or []]
    if uris is not None or dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("uris", "dns", "expected"),
    [
        (
            ["spiffe://example.org/ns/ci/sa/deployer"],
            None,
            "spiffe://example.org/ns/ci/sa/deployer",
        ),
        (["spiffe://example.org"], ["svc.example.org"], "spiffe://example.org"),
        (["spiffe://a.org/x", "spiffe://b.org/y"], None, None),
        (["spiffe://a.org/x", "https://a.org/x"], None, None),
        (["https://example.org/ns/ci"], None, None),
        (["SPIFFE://example.org/x"], None, None),
        (["spiffe://Example.org/x"], None, None),
        (["spiffe://example.org/x/"], None, None),
        (["spiffe://example.org/a/../admin"], None, None),
        (["spiffe://example.org/a//b"], None, None),
        (["spiffe://example.org/a?b=c"], None, None),
        (["spiffe://example.org/a%2Fb"], None, None),
        (["spiffe://user@example.org/a"], None, None),
        (["spiffe://example.org:443/a"], None, None),
        (["spiffe:///a"], None, None),
        ([], ["svc.example.org"], None),
        (None, None, None),
    ],
)
def test_spiffe_id_from_peer_cert(
    uris: list[str] | None, dns: list[str] | None, expected: str | None
) -> None:
    assert spiffe_id_from_peer_cert(_cert(uris, dns)) == expected


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01\x01", b"not a certificate" * 10])
def test_spiffe_id_from_garbage_is_none(garbage: bytes) -> None:
    assert spiffe_id_from_peer_cert(garbage) is None


def test_spiffe_id_length_cap() -> None:
    assert is_spiffe_id("spiffe://example.org/" + "a" * 2000)
    assert not is_spiffe_id("spiffe://example.org/" + "a" * 2100)


async def test_authenticate_spiffe_and_precedence(sa_key: TestKey) -> None:
    authn = Authenticator([k8s_issuer(sa_key)])
    spiffe_id = "spiffe://example.org/ns/ci/sa/deployer"
    result = await authn.authenticate(None, spiffe_id=spiffe_id)
    assert isinstance(result, Identity)
    assert result.kind is IdentityKind.SPIFFE
    assert (result.issuer, result.subject, result.spiffe_id) == ("", spiffe_id, spiffe_id)
    # A bad bearer token is never rescued by the client certificate.
    bad = await authn.authenticate("Bearer a.b.c", spiffe_id=spiffe_id)
    assert isinstance(bad, AuthnFailure)
    assert bad.reason is Reason.TOKEN_MALFORMED
    malformed = await authn.authenticate(None, spiffe_id="spiffe://EXAMPLE/x")
    assert isinstance(malformed, AuthnFailure)
    assert malformed.reason is Reason.TOKEN_INVALID
    missing = await authn.authenticate(None, None)
    assert isinstance(missing, AuthnFailure)
    assert missing.reason is Reason.CREDENTIAL_MISSING


# --- identity assertions ------------------------------------------------------------------------


def _identity() -> Identity:
    return Identity(kind=IdentityKind.JWT, issuer="ci", subject="deployer", token_id="j1")


def test_assertion_verifies_with_public_jwks_via_pyjwt() -> None:
    signer = AssertionSigner()
    now = 1_800_000_000.0
    token = signer.sign(_identity(), "payments/ci-deploy", "payments-api", 60, now)
    keys = signer.public_jwks()["keys"]
    assert isinstance(keys, list)
    jwk: dict[str, Any] = keys[0]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": signer.kid}
    claims = jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=["ES256"],
        audience="payments-api",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == "nhigate-proxy"
    assert claims["sub"] == "deployer"
    assert claims["grant"] == "payments/ci-deploy"
    assert claims["kind"] == "jwt"
    assert claims["idp"] == "ci"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["jti"]


def test_assertion_is_reused_until_half_life_then_renewed() -> None:
    signer = AssertionSigner()
    now = 1_800_000_000.0
    first = signer.sign(_identity(), "g", "aud", 60, now)
    assert signer.sign(_identity(), "g", "aud", 60, now + 29) == first
    assert signer.sign(_identity(), "g", "aud", 60, now + 30) != first
    assert signer.sign(_identity(), "other-grant", "aud", 60, now) != first
    other = Identity(kind=IdentityKind.JWT, issuer="ci", subject="someone-else")
    assert signer.sign(other, "g", "aud", 60, now) != first


def test_assertion_key_from_pem_and_wrong_key_type(sa_key: TestKey) -> None:
    ec_key = make_signing_key("ES256")
    signer = AssertionSigner(ec_key.private_pem())
    assert signer.public_jwks()["keys"][0]["x"] == ec_key.public_jwk["x"]  # type: ignore[index]
    with pytest.raises(ValueError, match="P-256"):
        AssertionSigner(sa_key.private_pem())
    with pytest.raises(ValueError, match="P-256"):
        AssertionSigner(make_signing_key("ES384").private_pem())


async def test_assertion_round_trips_through_authenticator() -> None:
    """Backends may verify assertions with the same strict rules the proxy uses."""
    signer = AssertionSigner()
    clock = FakeClock()
    token = signer.sign(_identity(), "g", "backend", 60, clock.now)
    issuer = IssuerConfig(
        name="proxy",
        issuer="nhigate-proxy",
        audiences=("backend",),
        algorithms=("ES256",),
        max_token_lifetime_seconds=60,
        clock_skew_seconds=0,
        jwks=signer.public_jwks(),
    )
    result = await Authenticator([issuer], clock=clock).authenticate("Bearer " + token)
    assert isinstance(result, Identity)
    assert result.subject == "deployer"
