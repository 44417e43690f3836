"""A corpus of invalid and hostile custom resources.

Each one is refused twice, by the two doors a resource can come through:
- the real kube-apiserver with the CRDs installed (OpenAPI schema, maxItems, patterns, enums
  and CEL rules), asserting the message the user sees (marker `cluster`);
- `nhigate.api.resources.load_resources` (standalone mode and `nhigate explain`), asserting a
  ResourceError that names the offending field.

A resource both doors accept on purpose (an opaque subject with a look-alike character) is
checked to grant nothing to the identity it imitates.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import jwks_for, make_signing_key

from nhigate.api.resources import ResourceError, load_resources
from nhigate.policy import Facts, Identity, IdentityKind, compile_policy, decide

KEY = make_signing_key("ES256", kid="bad-resources")
Manifest = dict[str, Any]


def issuer() -> Manifest:
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "IdentityIssuer",
        "metadata": {"name": "ci"},
        "spec": {
            "issuer": "https://issuer.test",
            "audiences": ["payments-api"],
            "algorithms": ["ES256"],
            "maxTokenLifetime": "1h",
            "jwks": jwks_for(KEY),
        },
    }


def service() -> Manifest:
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "ProtectedService",
        "metadata": {"name": "payments-api"},
        "spec": {"backend": {"service": "payments-api", "port": 8080}, "issuers": ["ci"]},
    }


def grant() -> Manifest:
    return {
        "apiVersion": "nhigate.io/v1alpha1",
        "kind": "RouteGrant",
        "metadata": {"name": "ci-read"},
        "spec": {
            "target": {"protectedService": "payments-api"},
            "subjects": [{"token": {"issuer": "ci", "subject": "ci-deployer"}}],
            "rules": [{"methods": ["GET"], "paths": ["/v1/items/**"]}],
        },
    }


@dataclass(frozen=True)
class Bad:
    name: str
    base: Callable[[], Manifest]
    mutate: Callable[[Manifest], object]
    field: str
    """The field path load_resources must name."""
    offline: str
    """A substring of load_resources' message."""
    server: tuple[str, ...]
    """Substrings of which the API server's refusal must contain at least one."""

    def manifest(self) -> Manifest:
        document = copy.deepcopy(self.base())
        self.mutate(document)
        return document


def _paths(*paths: str) -> Callable[[Manifest], object]:
    return lambda d: d["spec"]["rules"][0].__setitem__("paths", list(paths))


def _spec(**values: Any) -> Callable[[Manifest], object]:
    return lambda d: d["spec"].update(values)


MAX_ITEMS = ("must have at most", "Too many")
PATTERN = ("should match",)
ENUM = ("Unsupported value",)

CORPUS = [
    Bad(
        "subjects beyond maxItems",
        grant,
        _spec(subjects=[{"token": {"issuer": "ci", "subject": f"s{i}"}} for i in range(300)]),
        "spec.subjects",
        "at most 256",
        MAX_ITEMS,
    ),
    Bad(
        "rules beyond maxItems",
        grant,
        _spec(rules=[{"methods": ["GET"], "paths": [f"/p{i}"]} for i in range(200)]),
        "spec.rules",
        "at most 128",
        MAX_ITEMS,
    ),
    Bad(
        "paths beyond maxItems",
        grant,
        _paths(*(f"/p{i}" for i in range(40))),
        "spec.rules[0].paths",
        "at most 32",
        MAX_ITEMS,
    ),
    Bad(
        "audiences beyond maxItems",
        issuer,
        _spec(audiences=[f"aud-{i}" for i in range(50)]),
        "spec.audiences",
        "at most 32",
        MAX_ITEMS,
    ),
    Bad(
        "regex alternation path",
        grant,
        _paths("/(a|b)*"),
        "spec.rules[0].paths[0]",
        "may only contain",
        ("may only contain letters",),
    ),
    Bad(
        "regex dot-star path",
        grant,
        _paths("/v1/.*"),
        "spec.rules[0].paths[0]",
        "must be whole segments",
        ("must be whole segments",),
    ),
    Bad(
        "partial-segment wildcard",
        grant,
        _paths("/v1/adm*"),
        "spec.rules[0].paths[0]",
        "must be whole segments",
        ("must be whole segments",),
    ),
    Bad(
        "** before the last segment",
        grant,
        _paths("/**/admin"),
        "spec.rules[0].paths[0]",
        "must be whole segments",
        ("may only be the last",),
    ),
    Bad(
        "path traversal in a pattern",
        grant,
        _paths("/v1/items/../admin"),
        "spec.rules[0].paths[0]",
        "dot-segments",
        ("dot-segments",),
    ),
    Bad(
        "encoded traversal in a pattern",
        grant,
        _paths("/v1/%2e%2e/admin"),
        "spec.rules[0].paths[0]",
        "percent-encoded",
        ("percent-encoded",),
    ),
    Bad(
        "backslash traversal in a pattern",
        grant,
        _paths("/v1\\..\\admin"),
        "spec.rules[0].paths[0]",
        "backslash",
        ("backslash",),
    ),
    Bad(
        "double slash in a pattern",
        grant,
        _paths("//admin"),
        "spec.rules[0].paths[0]",
        '"//"',
        ('must not contain "//"',),
    ),
    Bad(
        "relative pattern",
        grant,
        _paths("admin/**"),
        "spec.rules[0].paths[0]",
        'start with "/"',
        ('must start with "/"',),
    ),
    Bad(
        "Cyrillic confusable in the grant name",
        grant,
        lambda d: d["metadata"].__setitem__("name", "p\u0430yments"),
        "metadata.name",
        "should match pattern",
        ("RFC 1123", "metadata.name"),
    ),
    Bad(
        "Cyrillic confusable in the issuer reference",
        grant,
        lambda d: d["spec"]["subjects"][0]["token"].__setitem__("issuer", "\u0441i"),
        "spec.subjects[0].token.issuer",
        "should match pattern",
        PATTERN,
    ),
    Bad(
        "fullwidth confusable in a path",
        grant,
        _paths("/v1/\uff41dmin"),
        "spec.rules[0].paths[0]",
        "may only contain",
        ("may only contain letters",),
    ),
    Bad(
        "subject with two identity forms",
        grant,
        lambda d: d["spec"]["subjects"][0].__setitem__(
            "serviceAccount", {"namespace": "ci", "name": "deployer"}
        ),
        "spec.subjects[0]",
        "exactly one of serviceAccount, token or spiffeId",
        ("exactly one of serviceAccount, token or spiffeId",),
    ),
    Bad(
        "expiresAt before notBefore",
        grant,
        _spec(notBefore="2030-01-02T00:00:00Z", expiresAt="2030-01-01T00:00:00Z"),
        "spec.expiresAt",
        "expiresAt must be after notBefore",
        ("expiresAt must be after notBefore",),
    ),
    Bad(
        "grant targeting another namespace",
        grant,
        lambda d: d["spec"]["target"].__setitem__("namespace", "kube-system"),
        "spec.target.namespace",
        "Extra inputs are not permitted",
        ("unknown field", "spec.target.namespace"),
    ),
    Bad(
        "method that is not a method",
        grant,
        lambda d: d["spec"]["rules"][0].__setitem__("methods", ["G ET"]),
        "spec.rules[0].methods[0]",
        "Input should be",
        ENUM,
    ),
    Bad(
        "alg none in an issuer",
        issuer,
        _spec(algorithms=["none"]),
        "spec.algorithms[0]",
        "Input should be",
        ENUM,
    ),
    Bad(
        "HS256 in algorithms",
        issuer,
        _spec(algorithms=["ES256", "HS256"]),
        "spec.algorithms[1]",
        "Input should be",
        ENUM,
    ),
    Bad(
        "private key material in inline jwks",
        issuer,
        lambda d: d["spec"]["jwks"]["keys"][0].__setitem__("d", "c2VjcmV0LXNjYWxhcg"),
        "spec.jwks.keys[0]",
        "public keys only",
        ("public keys only",),
    ),
    Bad(
        "symmetric key in inline jwks",
        issuer,
        lambda d: d["spec"]["jwks"].__setitem__(
            "keys", [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]
        ),
        "spec.jwks.keys[0].kty",
        "Input should be",
        ENUM,
    ),
    Bad(
        "jwks and jwksUri together",
        issuer,
        _spec(jwksUri="https://issuer.test/jwks"),
        "spec",
        "exactly one of jwksUri, jwks or kubernetes",
        ("exactly one of jwksUri, jwks or kubernetes",),
    ),
    Bad(
        "file:// jwksUri",
        issuer,
        lambda d: (d["spec"].pop("jwks"), d["spec"].__setitem__("jwksUri", "file:///etc/passwd")),
        "spec.jwksUri",
        "should match pattern",
        PATTERN,
    ),
    Bad(
        "zero token lifetime",
        issuer,
        _spec(maxTokenLifetime="0s"),
        "spec.maxTokenLifetime",
        "longer than 0s",
        ("longer than 0s",),
    ),
]


@pytest.mark.parametrize("bad", CORPUS, ids=[b.name for b in CORPUS])
def test_load_resources_names_the_field(bad: Bad, tmp_path: Path) -> None:
    manifest = bad.manifest()
    manifest["metadata"]["namespace"] = "payments"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest, allow_unicode=True))
    with pytest.raises(ResourceError) as caught:
        load_resources([path])
    message = str(caught.value)
    assert f"{bad.field}:" in message, message
    assert bad.offline in message, message


def _apply(control_plane: Any, namespace: str, manifest: Manifest) -> Any:
    return control_plane.kubectl(
        "create", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )


def test_the_api_server_refuses_every_hostile_resource(
    control_plane: Any, namespace: str, crds_installed: list[str]
) -> None:
    refused = 0
    failures: list[str] = []
    for bad in CORPUS:
        result = _apply(control_plane, namespace, bad.manifest())
        output = result.stdout + result.stderr
        if result.returncode == 0:
            failures.append(f"{bad.name}: accepted by the API server")
        elif bad.field not in output or not any(text in output for text in bad.server):
            failures.append(f"{bad.name}: refused without {bad.server}: {output[-400:]}")
        else:
            refused += 1
    assert failures == [], "\n".join(failures)
    # The valid bases are accepted (the corpus fails for its mutation, not its base).
    for base in (issuer, service, grant):
        result = _apply(control_plane, namespace, base())
        assert result.returncode == 0, result.stderr
    print(f"bad resources: {refused}/{len(CORPUS)} refused by the API server")


CONFUSABLE_SUBJECT = "ci-d\u0435ployer"  # U+0435 CYRILLIC SMALL LETTER IE: another subject


def test_a_confusable_subject_grants_nothing_to_the_identity_it_imitates(tmp_path: Path) -> None:
    confusable = grant()
    confusable["spec"]["subjects"][0]["token"]["subject"] = CONFUSABLE_SUBJECT
    documents = [issuer(), service(), confusable]
    for document in documents:
        document["metadata"]["namespace"] = "payments"
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(documents, allow_unicode=True))
    resources = load_resources([path])  # an opaque subject string: accepted on purpose
    from datetime import UTC, datetime

    policy = compile_policy(resources.policy_document_for(None, datetime.now(UTC)))

    def allowed(subject: str) -> bool:
        identity = Identity(kind=IdentityKind.JWT, issuer="ci", subject=subject)
        facts = Facts(identity=identity, method="GET", path="/v1/items/1", now=time.time())
        return decide(policy, facts).allowed

    assert allowed(CONFUSABLE_SUBJECT)
    assert not allowed("ci-deployer")
    assert not allowed("CI-DEPLOYER")
