"""nhigate.policy.kinds: the one spelling of group, version, kinds and plurals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nhigate.api.models import API_VERSION, RESOURCE_TYPES, Resource
from nhigate.k8s.resources import ref_for


@pytest.mark.parametrize("model", RESOURCE_TYPES, ids=lambda m: m.KIND)
def test_rest_paths_name_what_the_crds_serve(model: type[Resource]) -> None:
    ref = ref_for(API_VERSION, model.KIND)
    assert (ref.api_version, ref.kind, ref.plural) == (API_VERSION, model.KIND, model.PLURAL)
    assert ref.path("shop", "x") == f"/apis/nhigate.io/v1alpha1/namespaces/shop/{model.PLURAL}/x"


def test_k8s_builds_nhigate_paths_without_loading_the_pydantic_models() -> None:
    """The in-cluster proxy talks to the API through nhigate.k8s and never needs pydantic."""
    code = "import sys, nhigate.k8s; print('nhigate.api' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
