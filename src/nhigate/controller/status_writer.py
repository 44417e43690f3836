"""Writing what the controller judged: status subresources and core/v1 Events.

`StatusWriter` is the one place that talks to the API server about status: it merges
desired conditions into those already written (`status.merge_conditions`), skips a write
that would change nothing, tolerates an object deleted meanwhile, and posts Events for
RouteGrant transitions and other notable findings. What the conditions say is decided
elsewhere (`status.py` and the judgements).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from nhigate.api import conditions as c
from nhigate.api.models import Condition, RouteGrantStatus
from nhigate.api.validation import StatusModel
from nhigate.controller.status import merge_conditions
from nhigate.k8s import ROUTEGRANTS, KubeClient, KubeError, ResourceRef
from nhigate.policy.times import format_seconds

JSON = dict[str, Any]
StatusModelT = TypeVar("StatusModelT", bound=StatusModel)
_EVENT_MESSAGE_MAX = 1024


def status_json(fields: StatusModel) -> JSON:
    """A `*Status` model as the API stores it: camelCase, only the fields that were set,
    None omitted."""
    dumped: JSON = fields.model_dump(
        by_alias=True, exclude_unset=True, exclude_none=True, mode="json"
    )
    return dumped


class StatusWriter:
    """Status and Event writes of one controller process."""

    def __init__(
        self,
        client: KubeClient,
        *,
        field_manager: str,
        logger: logging.Logger,
        clock: Callable[[], float],
    ) -> None:
        self.client = client
        self.field_manager = field_manager
        self.log = logger
        self.clock = clock

    def conditions(self, body: Mapping[str, Any], desired: Iterable[JSON]) -> list[JSON]:
        """`body`'s current conditions with `desired` merged in, stamped with its generation."""
        previous = body.get("status") or {}
        generation = (body.get("metadata") or {}).get("generation")
        return merge_conditions(
            previous.get("conditions"), desired, now=self.clock(), generation=generation
        )

    def render(
        self, body: Mapping[str, Any], fields: StatusModelT, desired: Iterable[JSON]
    ) -> JSON:
        """The status to write: `fields` with `desired` merged into `body`'s conditions, as
        the API stores it."""
        conditions = [Condition.model_validate(x) for x in self.conditions(body, desired)]
        return status_json(fields.model_copy(update={"conditions": conditions}))

    async def apply(
        self,
        ref: ResourceRef,
        body: Mapping[str, Any],
        fields: StatusModel,
        desired: Iterable[JSON],
    ) -> bool:
        """Write `fields` and the `desired` conditions unless that changes nothing; True when
        written."""
        return await self._write(ref, body, self.render(body, fields, desired))

    async def _write(self, ref: ResourceRef, body: Mapping[str, Any], status: JSON) -> bool:
        previous = body.get("status") or {}
        if all(previous.get(k) == v for k, v in status.items()):
            return False
        meta = body.get("metadata") or {}
        patch = {
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "status": status,
        }
        try:
            await self.client.apply_status(ref, patch, field_manager=self.field_manager)
        except KubeError as exc:
            if exc.status == 404:
                return False  # deleted meanwhile
            raise
        return True

    async def write_grant(self, body: JSON, desired: list[JSON], fields: RouteGrantStatus) -> None:
        """A RouteGrant's status: `desired` conditions plus `fields` (its `expiresAt` and
        `observedGeneration` taken from `body`); then the Events of its transitions. `body`
        becomes the new baseline once written."""
        meta = body.get("metadata") or {}
        previous = body.get("status") or {}
        before = {str(x.get("type")): x for x in previous.get("conditions") or ()}
        expires_at = (body.get("spec") or {}).get("expiresAt") or None
        stamped = fields.model_copy(update={"observed_generation": meta.get("generation")})
        status = self.render(body, stamped, desired)
        if expires_at:
            status["expiresAt"] = expires_at  # echoed as spelled in the spec
        if not await self._write(ROUTEGRANTS, body, status):
            return
        body["status"] = {**previous, **status}  # what we wrote is the new baseline
        await self._grant_events(body, before, {d["type"]: d for d in desired})

    async def _grant_events(
        self, body: JSON, before: Mapping[str, Mapping[str, Any]], after: Mapping[str, JSON]
    ) -> None:
        for type_, reason, message in grant_transitions(before, after):
            await self.post_event(body, type_, reason, message)

    async def post_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """Post a core/v1 Event about `involved`; failures are logged, never raised."""
        meta = involved.get("metadata") or {}
        now = format_seconds(self.clock())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:_EVENT_MESSAGE_MAX],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "nhigate-controller"},
            "reportingComponent": "nhigate.io/controller",
            "reportingInstance": "nhigate-controller",
        }
        try:
            await self.client.create(event)
        except KubeError as exc:
            self.log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc)


def grant_transitions(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events a RouteGrant's conditions going from `before`
    to `after` (by condition type) deserve: accept/reject/expire transitions only, not every
    write."""
    events: list[tuple[str, str, str]] = []
    old, new = before.get(c.ACCEPTED), after.get(c.ACCEPTED)
    if new is not None and (
        old is None or old.get("status") != new["status"] or old.get("reason") != new["reason"]
    ):
        if new["status"] == c.TRUE:
            events.append(("Normal", "Accepted", new["message"]))
        else:
            events.append(("Warning", "Rejected", new["message"]))
    old, new = before.get(c.ACTIVE), after.get(c.ACTIVE)
    if (
        new is not None
        and new["reason"] == c.REASON_EXPIRED
        and (old is None or old.get("reason") != c.REASON_EXPIRED)
    ):
        events.append(("Normal", "Expired", new["message"]))
    return events


def service_transitions(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events a ProtectedService's conditions going from
    `before` to `after` (by condition type) deserve: a proxy that is held back because the
    backend protocol is in dispute (bypass paths have Events of their own)."""
    old, new = before.get(c.BACKEND_PROTOCOL_RESOLVED), after.get(c.BACKEND_PROTOCOL_RESOLVED)
    mismatch = c.REASON_APP_PROTOCOL_MISMATCH
    if new is not None and new["reason"] == mismatch and (old or {}).get("reason") != mismatch:
        return [("Warning", mismatch, new["message"])]
    return []
