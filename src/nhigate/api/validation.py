"""CEL validation rules that exist twice: in the CRD and as a Python check.

Every cross-field rule the API server enforces through `x-kubernetes-validations`
is declared once here, as a `CelRule` carrying the CEL text, the message the
user sees, and a Python predicate that must agree with the CEL. The CRD
generator copies `rule`/`message`; pydantic runs `check` with the same message,
so standalone mode and `nhigate explain` reject exactly what the API server
rejects, with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

CEL_ERROR_TYPE = "cel_rule"
"""The pydantic error type raised when a mirrored CEL rule fails."""


@dataclass(frozen=True, slots=True)
class CelRule:
    """One `x-kubernetes-validations` entry and its Python mirror.

    `rule=None` marks a Python-only guard with no CRD counterpart (kept rare:
    each one is a place where the API server accepts what Python rejects).
    `check` receives the validated value (a model instance for object rules, the
    scalar for field rules) and returns True when the rule holds. `field_path`
    is the CEL `fieldPath` (e.g. ``.expiresAt``) the API server reports.
    """

    rule: str | None
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None

    def as_schema(self) -> dict[str, str] | None:
        """The CRD `x-kubernetes-validations` entry (None for a Python-only guard)."""
        if self.rule is None:
            return None
        entry = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            entry["fieldPath"] = self.field_path
        return entry

    def enforce(self, value: Any) -> None:
        """Raise the pydantic error the API server's message corresponds to, if `value` fails."""
        if not self.check(value):
            context = {"field_path": self.field_path or ""}
            raise PydanticCustomError(CEL_ERROR_TYPE, self.message, context)


@dataclass(frozen=True, slots=True)
class Cel:
    """`Annotated[str, Cel(rule, ...)]`: CEL rules on a scalar field or list item."""

    rules: tuple[CelRule, ...]

    def __init__(self, *rules: CelRule) -> None:
        object.__setattr__(self, "rules", rules)

    def _validate(self, value: Any) -> Any:
        for rule in self.rules:
            rule.enforce(value)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        entries = [entry for rule in self.rules if (entry := rule.as_schema()) is not None]
        if entries:
            json_schema.setdefault("x-kubernetes-validations", []).extend(entries)
        return json_schema


CAMEL_CASE = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    frozen=True,
)
"""What every API model shares: camelCase on the wire (snake_case in Python), immutable."""


def _add_model_rules(schema: dict[str, Any], model: type[Any]) -> None:
    rules: tuple[CelRule, ...] = getattr(model, "cel_rules", ())
    entries = [entry for rule in rules if (entry := rule.as_schema()) is not None]
    if entries:
        schema["x-kubernetes-validations"] = entries


class SpecModel(BaseModel):
    """Base of every spec part: camelCase aliases, unknown fields rejected, immutable.

    Subclasses list their object-level CEL rules in `cel_rules`; they are
    checked after field validation and copied into the CRD schema.
    """

    model_config = ConfigDict(**CAMEL_CASE, extra="forbid", json_schema_extra=_add_model_rules)

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _enforce_cel_rules(self) -> Self:
        """Run the mirrored CEL rules once every field is valid."""
        for rule in type(self).cel_rules:
            rule.enforce(self)
        return self


class StatusModel(BaseModel):
    """Base of status parts: like `SpecModel` but ignores fields it does not know."""

    model_config = ConfigDict(**CAMEL_CASE, extra="ignore")
