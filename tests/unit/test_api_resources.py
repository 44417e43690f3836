"""load_resources: every example loads; every error names file, document, resource and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from nhigate.api.resources import ResourceError, load_resources

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GRANT = """\
apiVersion: nhigate.io/v1alpha1
kind: RouteGrant
metadata: {name: ci-deploy, namespace: payments}
spec:
  target: {protectedService: payments-api}
  subjects: [{token: {issuer: ci, subject: job}}]
  rules: [{methods: [GET], paths: ["/v1/ok", "%s"]}]
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


KUBERNETES_EXAMPLES = {"00-namespace.yaml", "backend.yaml"}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_file_loads_on_its_own(name: str) -> None:
    resources = load_resources([EXAMPLES / name])
    total = (
        len(resources.issuers)
        + len(resources.services)
        + len(resources.grants)
        + len(resources.revocations)
    )
    # The namespace and the sample backend are Kubernetes' own kinds: not nhigate resources.
    assert total == (0 if name in KUBERNETES_EXAMPLES else 1)


def test_examples_directory_is_one_consistent_set() -> None:
    resources = load_resources([EXAMPLES])
    service = resources.service()
    assert service.key == "payments/payments-api"
    assert {i.name for i in resources.issuers} == set(service.spec.issuers)
    assert {g.spec.target.protected_service for g in resources.grants} == {service.name}
    assert all(r.namespace == "payments" for r in (*resources.grants, *resources.revocations))
    agent = next(g for g in resources.grants if g.name == "invoice-agent")
    assert agent.spec.expires_at is not None
    assert agent.spec.rate_limit is not None


def test_error_names_file_resource_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "grant.yaml", GRANT % "v1/payments")
    with pytest.raises(ResourceError) as info:
        load_resources([path])
    assert str(info.value) == (
        f'{path}: RouteGrant ci-deploy: spec.rules[0].paths[1]: must start with "/"'
    )


def test_multi_document_errors_name_the_document(tmp_path: Path) -> None:
    text = GRANT % "/fine" + "---\n" + (GRANT % "/a/../b").replace("ci-deploy", "second")
    path = _write(tmp_path, "grants.yaml", text)
    with pytest.raises(
        ResourceError,
        match=r"grants\.yaml \(document 2\): RouteGrant second: "
        r"spec\.rules\[0\]\.paths\[1\]: must not contain dot-segments",
    ):
        load_resources([path])


def test_several_problems_are_listed(tmp_path: Path) -> None:
    text = GRANT.replace("subject: job", "claims: {}") % "/a//b"
    path = _write(tmp_path, "g.yaml", text)
    with pytest.raises(ResourceError) as info:
        load_resources([path])
    message = str(info.value)
    assert "2 problems" in message
    assert "spec.subjects[0].token: a token subject needs subject or at least one claim" in message
    assert 'spec.rules[0].paths[1]: must not contain "//"' in message


def test_cel_field_path_is_appended(tmp_path: Path) -> None:
    text = (GRANT % "/x") + "  notBefore: 2026-01-02T00:00:00Z\n  expiresAt: 2026-01-01T00:00:00Z\n"
    path = _write(tmp_path, "g.yaml", text)
    with pytest.raises(ResourceError, match=r"spec\.expiresAt: expiresAt must be after notBefore"):
        load_resources([path])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: [unclosed\n", r"invalid YAML \(line 2, column 1\)"),
        ("- just\n- a list\n", "expected a mapping"),
        (
            "apiVersion: nhigate.io/v1\nkind: RouteGrant\nmetadata: {name: x}\n",
            "is not nhigate.io/v1alpha1",
        ),
        (
            "apiVersion: nhigate.io/v1alpha1\nkind: Grant\nmetadata: {name: x}\n",
            "unknown kind 'Grant'",
        ),
        (
            "apiVersion: nhigate.io/v1alpha1\nkind: RouteGrant\nmetadata: {name: x}\n",
            "RouteGrant x: spec: Field required",
        ),
        (
            "apiVersion: nhigate.io/v1alpha1\nkind: RouteGrant\nspec: {}\n",
            r"RouteGrant \(unnamed\)",
        ),
    ],
)
def test_bad_documents(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ResourceError, match=expected) as info:
        load_resources([path])
    assert str(path) in str(info.value)


def test_foreign_documents_are_ignored_and_duplicates_refused(tmp_path: Path) -> None:
    ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: payments}\n---\n"
    _write(tmp_path, "a.yaml", ns + GRANT % "/x")
    assert len(load_resources([tmp_path]).grants) == 1
    _write(tmp_path, "b.yml", GRANT % "/y")
    with pytest.raises(ResourceError, match="RouteGrant payments/ci-deploy is also defined in"):
        load_resources([tmp_path])


def test_missing_path_and_service_lookup(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="no such file"):
        load_resources([tmp_path / "nope"])
    resources = load_resources([EXAMPLES])
    with pytest.raises(ResourceError, match="no ProtectedService 'orders'"):
        resources.service("orders")


def test_timestamps_stay_strings_so_naive_times_are_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "g.yaml", (GRANT % "/x") + "  expiresAt: 2026-01-01T00:00:00\n")
    with pytest.raises(ResourceError, match=r"spec\.expiresAt: .*timezone"):
        load_resources([path])


def test_kubectl_list_output_is_read_item_by_item(tmp_path: Path) -> None:
    # `kubectl get routegrants -o yaml` writes a v1 List; its items are the resources.
    item = "\n".join("    " + line for line in (GRANT % "/v1/more").splitlines())
    listing = f"apiVersion: v1\nkind: List\nmetadata: {{}}\nitems:\n  -\n{item}\n"
    resources = load_resources([_write(tmp_path, "grants.yaml", listing)])
    assert [g.key for g in resources.grants] == ["payments/ci-deploy"]
    bad = listing.replace("/v1/more", "v1/more")
    with pytest.raises(ResourceError, match=r"spec\.rules\[0\]\.paths\[1\]"):
        load_resources([_write(tmp_path, "bad.yaml", bad)])
