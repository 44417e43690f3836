"""The committed crds/ are exactly what hack/generate_crds.py produces from the models."""

from __future__ import annotations

from pathlib import Path

from nhigate.api.crds import build_crds

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


def test_committed_crds_match_the_models() -> None:
    wanted = build_crds()
    committed = {p.name for p in CRD_DIR.glob("*.yaml")}
    assert committed == set(wanted), "crds/ has missing or extra files: run hack/generate_crds.py"
    for name, text in wanted.items():
        assert (CRD_DIR / name).read_text() == text, (
            f"crds/{name} is stale: run .venv/bin/python hack/generate_crds.py"
        )
