"""docs/api-reference.md is generated from the models and must not go stale."""

from __future__ import annotations

from pathlib import Path

from nhigate.api.reference import render_api_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"


def test_api_reference_is_up_to_date() -> None:
    assert DOC.read_text() == render_api_reference(), (
        "docs/api-reference.md is stale: run .venv/bin/python hack/generate_api_docs.py"
    )


def test_reference_covers_every_resource_and_key_field() -> None:
    text = render_api_reference()
    for heading in ("## IdentityIssuer", "## ProtectedService", "## RouteGrant", "## Revocation"):
        assert heading in text
    assert "| `rules[].paths` | []string |" in text
    assert "| `proxy.replicas` | integer | `2` |" in text
    assert "- `spec.expiresAt`: expiresAt must be after notBefore" in text
