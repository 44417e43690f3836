"""YAML we ship reads the same in YAML 1.1 readers (kubectl, Helm, the API server).

PyYAML leaves `y`/`n` bare, but Go's YAML 1.1 readers turn them into booleans: the JWK
members `y` and `n` silently became "true"/"false" keys once. Parse every shipped file
with a loader that resolves those words as booleans too and require the same result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Helm template sources are not plain YAML; the chart tests render and check them.
SHIPPED = sorted(
    p
    for p in [
        *ROOT.glob("crds/*.yaml"),
        *ROOT.glob("examples/*.yaml"),
        *ROOT.glob("charts/**/*.yaml"),
    ]
    if "templates" not in p.parts
)


class Yaml11Loader(yaml.SafeLoader):
    """SafeLoader plus the YAML 1.1 booleans PyYAML does not resolve (y, n and case forms)."""

    bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}


Yaml11Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
)


def _load_all(text: str, loader: type[yaml.SafeLoader]) -> list[Any]:
    return list(yaml.load_all(text, Loader=loader))


def test_the_yaml11_loader_really_reads_bare_y_as_a_boolean() -> None:
    assert _load_all("y: 1\n", Yaml11Loader) == [{True: 1}]
    assert _load_all("'y': 1\n", Yaml11Loader) == [{"y": 1}]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_reads_the_same_in_yaml11(path: Path) -> None:
    text = path.read_text()
    assert _load_all(text, Yaml11Loader) == _load_all(text, yaml.SafeLoader)
