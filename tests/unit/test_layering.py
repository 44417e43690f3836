"""The package boundaries of docs/architecture.md hold: checked by import-linter on every run."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert "KEPT" in result.stdout


def test_no_module_shadows_the_stdlib_operator_module() -> None:
    offenders = [p for p in (ROOT / "src").rglob("*.py") if p.stem == "operator"]
    offenders += [p for p in (ROOT / "src").rglob("operator") if p.is_dir()]
    assert offenders == []


def test_every_forbidden_contract_counts_indirect_imports() -> None:
    """docs/architecture.md promises "not even indirectly": no contract may waive that."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = pyproject["tool"]["importlinter"]["contracts"]
    waived = [c["name"] for c in contracts if c.get("allow_indirect_imports")]
    assert waived == []
    policy = next(c for c in contracts if c["source_modules"] == ["nhigate.policy"])
    assert policy["type"] == "forbidden"
