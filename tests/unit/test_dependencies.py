"""What pyproject.toml promises about dependencies: runtime ones are what nhigate runs on.

The image installs `[project].dependencies` and nothing else, so a library only the tests,
bench/ or hack/ import belongs in the `dev` extra; otherwise every image carries it.
"""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _top_level_imports(root: Path) -> set[str]:
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _normalise(distribution: str) -> str:
    return distribution.lower().replace("_", "-")


def test_every_runtime_dependency_is_imported_by_nhigate() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    runtime = {_normalise(d.split("==")[0]) for d in pyproject["project"]["dependencies"]}
    by_module = packages_distributions()
    imported = {
        _normalise(dist)
        for module in _top_level_imports(REPO_ROOT / "src" / "nhigate")
        for dist in by_module.get(module, ())
    }
    unused = sorted(runtime - imported)
    assert not unused, f"runtime dependencies nhigate never imports (move them to dev): {unused}"


def test_image_constraints_pin_only_what_the_runtime_needs() -> None:
    """images/constraints.txt names no test-only library (the image would download it)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    runtime = {_normalise(d.split("==")[0]) for d in pyproject["project"]["dependencies"]}
    dev_only = {
        _normalise(d.split("==")[0]) for d in pyproject["project"]["optional-dependencies"]["dev"]
    } - runtime
    lines = (REPO_ROOT / "images" / "constraints.txt").read_text().splitlines()
    pinned = {_normalise(ln.split("==")[0]) for ln in lines if ln.strip() and ln[0] != "#"}
    assert not pinned & dev_only, f"constraints pin dev-only libraries: {pinned & dev_only}"


def _runtime_closure(roots: set[str]) -> set[str]:
    """The installed distributions `roots` need at run time, following their metadata."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in requires(name) or ():
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_normalise(requirement.name))
    return seen


def test_every_third_party_import_is_a_runtime_dependency() -> None:
    """A library src/nhigate imports is declared, not merely installed as another's dependency."""
    import sys

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    runtime = {_normalise(d.split("==")[0]) for d in pyproject["project"]["dependencies"]}
    optional = {
        _normalise(d.split("==")[0])
        for extra, deps in pyproject["project"]["optional-dependencies"].items()
        if extra != "dev"
        for d in deps
    }
    by_module = packages_distributions()
    third_party = _top_level_imports(REPO_ROOT / "src" / "nhigate") - set(sys.stdlib_module_names)
    undeclared = sorted(
        _normalise(dist)
        for module in third_party - {"nhigate"}
        for dist in by_module.get(module, ())
        if _normalise(dist) not in runtime | optional
    )
    assert not undeclared, f"src/nhigate imports undeclared libraries: {undeclared}"


def test_image_constraints_pin_the_whole_runtime_closure() -> None:
    """The offline image install finds a pin for every runtime dependency, direct or not."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    runtime = {_normalise(d.split("==")[0]) for d in pyproject["project"]["dependencies"]}
    lines = (REPO_ROOT / "images" / "constraints.txt").read_text().splitlines()
    pinned = {_normalise(ln.split("==")[0]) for ln in lines if ln.strip() and ln[0] != "#"}
    missing = sorted(_runtime_closure(runtime) - pinned)
    assert not missing, f"images/constraints.txt lacks pins for: {missing}"
