"""Controller settings reach kopf as intended."""

from __future__ import annotations

import kopf

from nhigate.controller.handlers import configure_kopf
from nhigate.controller.settings import ControllerSettings


def test_replicas_get_distinct_peering_priorities() -> None:
    # kopf pauses every replica whose priority ties with another's: ties stop all reconciling.
    priorities = {ControllerSettings(proxy_image="img").peering_priority for _ in range(50)}
    assert len(priorities) == 50
    assert all(p > 0 for p in priorities)


def test_configure_kopf_applies_peering_and_annotation_prefix() -> None:
    settings = ControllerSettings(
        proxy_image="img", peering=True, peering_name="ha", peering_priority=7
    )
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    assert kopf_settings.peering.priority == 7
    assert kopf_settings.peering.name == "ha"
    assert kopf_settings.peering.standalone is False
    assert kopf_settings.persistence.finalizer.startswith("nhigate.io/")
