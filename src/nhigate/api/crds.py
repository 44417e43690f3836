"""CustomResourceDefinitions derived from the pydantic models.

`build_crds()` turns each model's JSON schema into a *structural* OpenAPI v3
schema as the API server requires: every `$ref` inlined, optional fields as
plain types (no `anyOf` with null, no `nullable`), `additionalProperties`
only for maps, `exclusiveMinimum` in its OpenAPI 3.0 boolean form, titles
dropped. CEL rules come from the models (`nhigate.api.validation`).
`hack/generate_crds.py` writes the result to `crds/`.
"""

from __future__ import annotations

from typing import Any

import yaml

from nhigate.api.models import (
    GROUP,
    RESOURCE_TYPES,
    ROOT_RULES,
    VERSION,
    Resource,
)

CATEGORY = "nhigate"


def _ready_column(condition: str, description: str) -> dict[str, Any]:
    return {
        "name": condition,
        "type": "string",
        "description": description,
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
    }


_AGE = {
    "name": "Age",
    "type": "date",
    "description": "Time since the object was created.",
    "jsonPath": ".metadata.creationTimestamp",
}

PRINTER_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "IdentityIssuer": [
        {
            "name": "Issuer",
            "type": "string",
            "description": "The `iss` claim of accepted tokens.",
            "jsonPath": ".spec.issuer",
        },
        _ready_column("Ready", "Keys fetched and parsed."),
        {
            "name": "Keys",
            "type": "integer",
            "description": "Keys in the last successful fetch.",
            "jsonPath": ".status.keyCount",
        },
        _AGE,
    ],
    "ProtectedService": [
        {
            "name": "Backend",
            "type": "string",
            "description": "The backend Service behind the proxy.",
            "jsonPath": ".spec.backend.service",
        },
        _ready_column("Ready", "Everything reconciled and the proxy serving."),
        _ready_column("DirectPathBlocked", "No path to the backend skips the proxy."),
        {
            "name": "Enforced",
            "type": "string",
            "description": "Live proxy replicas serving the current policy, out of all.",
            "jsonPath": ".status.enforcedReplicas",
        },
        {
            "name": "Protocol",
            "type": "string",
            "description": "The backend's protocol as resolved (BackendProtocolResolved).",
            "jsonPath": ".status.backendProtocol",
            "priority": 1,
        },
        _AGE,
    ],
    "RouteGrant": [
        {
            "name": "Target",
            "type": "string",
            "description": "The ProtectedService the grant applies to.",
            "jsonPath": ".spec.target.protectedService",
        },
        _ready_column("Accepted", "The grant is valid and its target exists."),
        _ready_column("Enforced", "Every proxy replica serves a policy with this grant."),
        # A string, not a date: kubectl prints future dates as "<invalid>".
        {
            "name": "Expires",
            "type": "string",
            "description": "When the grant stops allowing anything.",
            "jsonPath": ".spec.expiresAt",
        },
        {
            "name": "Last-Used",
            "type": "date",
            "description": "When a proxy last allowed a request with this grant.",
            "jsonPath": ".status.usage.lastUsed",
        },
        _AGE,
    ],
    "Revocation": [
        {
            "name": "Issuer",
            "type": "string",
            "description": "The IdentityIssuer whose subject is revoked.",
            "jsonPath": ".spec.issuer",
        },
        {
            "name": "Subject",
            "type": "string",
            "description": "The revoked `sub` claim.",
            "jsonPath": ".spec.subject",
        },
        {
            "name": "TokenID",
            "type": "string",
            "description": "The revoked token's `jti` claim.",
            "jsonPath": ".spec.tokenId",
            "priority": 1,
        },
        {
            "name": "Until",
            "type": "string",
            "description": "When the revocation ends (empty: never).",
            "jsonPath": ".spec.until",
        },
        _ready_column("Accepted", "The revocation is valid and what it names exists."),
        _AGE,
    ],
}

_DROP_KEYS = frozenset({"title", "$defs"})
_LEADING_KEYS = ("description", "type", "format", "default", "enum")


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref`, letting sibling keys (description, default) override the target."""
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**defs[name], **siblings}
    return schema


def _without_null(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`X | None` -> X: optional means "may be absent", never null."""
    if "anyOf" not in schema or schema.get("x-kubernetes-int-or-string"):
        return schema
    options = [o for o in schema["anyOf"] if o.get("type") != "null"]
    if len(options) != 1:
        resolved = [_resolve(o, defs) for o in options]
        if all(o.get("x-kubernetes-int-or-string") for o in resolved):
            options = resolved[:1]
        else:
            raise ValueError(f"cannot express a union of differing types structurally: {schema}")
    siblings = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**_resolve(options[0], defs), **siblings}


def to_structural(
    schema: dict[str, Any], defs: dict[str, Any], *, in_status: bool
) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and its children) to a structural schema node."""
    node = _without_null(_resolve(schema, defs), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default" and (value is None or in_status):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {
                name: to_structural(child, defs, in_status=in_status)
                for name, child in value.items()
            }
        elif key == "items":
            out["items"] = to_structural(value, defs, in_status=in_status)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out["additionalProperties"] = to_structural(value, defs, in_status=in_status)
            # `false` is the structural default once `properties` is given: drop it.
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "required":
            out["required"] = sorted(value)
        else:
            out[key] = value
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["properties"] = {}
    first = [k for k in _LEADING_KEYS if k in out]
    return {k: out[k] for k in [*first, *(k for k in out if k not in _LEADING_KEYS)]}


def _part_schema(model: type[Resource], field: str) -> dict[str, Any]:
    annotation = model.model_fields[field].annotation
    assert annotation is not None
    raw = annotation.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return to_structural(raw, defs, in_status=field == "status")


def _field_description(model: type[Resource], field: str) -> str:
    description = model.model_fields[field].description
    assert description, f"{model.KIND}.{field} has no description"
    return description


def build_crd(model: type[Resource]) -> dict[str, Any]:
    """The CustomResourceDefinition for one resource model."""
    spec_schema = _part_schema(model, "spec")
    status_schema = _part_schema(model, "status")
    root: dict[str, Any] = {
        "type": "object",
        "description": (model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": _field_description(model, "api_version"),
                "type": "string",
            },
            "kind": {"description": _field_description(model, "kind"), "type": "string"},
            # The API server owns metadata: a CRD may not describe it (it publishes ObjectMeta,
            # with Kubernetes' own description, in its place).
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    root_rules = [r.as_schema() for r in ROOT_RULES.get(model.KIND, ())]
    if root_rules:
        root["x-kubernetes-validations"] = [r for r in root_rules if r is not None]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{model.PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "nhigate", "app.kubernetes.io/part-of": "nhigate"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": model.KIND,
                "listKind": f"{model.KIND}List",
                "plural": model.PLURAL,
                "singular": model.KIND.lower(),
                "shortNames": [model.SHORT_NAME],
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS[model.KIND],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd_file_name(model: type[Resource]) -> str:
    """`<plural>.nhigate.io.yaml`, the file name under `crds/`."""
    return f"{model.PLURAL}.{GROUP}.yaml"


class _NoAliasDumper(yaml.SafeDumper):
    """Never write YAML anchors/aliases: each schema node is spelled out."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# Words YAML 1.1 readers (kubectl, Helm, the API server's sigs.k8s.io/yaml) take as booleans,
# though PyYAML writes them bare: the JWK members `n` and `y` would become "false"/"true".
YAML11_BOOL_WORDS = frozenset(
    w
    for word in ("y", "n", "yes", "no", "on", "off", "true", "false")
    for w in (word, word.upper(), word.capitalize())
)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "'" if data in YAML11_BOOL_WORDS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_NoAliasDumper.add_representer(str, _represent_str)


def render_crd(crd: dict[str, Any]) -> str:
    """Deterministic YAML for a CRD (what `crds/` holds)."""
    header = "# Generated by hack/generate_crds.py from src/nhigate/api/models.py. Do not edit.\n"
    body = yaml.dump(crd, Dumper=_NoAliasDumper, sort_keys=False, width=100, allow_unicode=False)
    return header + body


def build_crds() -> dict[str, str]:
    """File name -> rendered YAML for every nhigate CRD."""
    return {crd_file_name(model): render_crd(build_crd(model)) for model in RESOURCE_TYPES}
