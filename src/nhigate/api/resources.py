"""Load nhigate custom resources from YAML files, as a user would `kubectl apply` them.

Used by standalone mode and by `nhigate explain` / `who-can`. Every problem is
a `ResourceError` whose message names the file, the document (when the file
holds several), the resource and the field, e.g.::

    grant.yaml: RouteGrant ci-deploy: spec.rules[0].paths[1]: must start with "/"
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nhigate.api.compile import build_policy_document
from nhigate.api.models import (
    API_VERSION,
    GROUP,
    RESOURCE_BY_KIND,
    IdentityIssuer,
    ProtectedService,
    Resource,
    Revocation,
    RouteGrant,
)
from nhigate.api.validation import CEL_ERROR_TYPE
from nhigate.policy import PolicyDocument

YAML_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 4 * 1024 * 1024
"""Refuse larger resource files: they are certainly not hand-written manifests."""


class ResourceError(ValueError):
    """A resource file could not be read or a resource in it is invalid."""


class _StringTimestampLoader(yaml.CSafeLoader):
    """The safe loader (libyaml's, ~10x faster on 10k grants) keeping timestamps as strings,
    as the API server receives them (JSON)."""


_StringTimestampLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
}


def format_location(loc: Sequence[int | str]) -> str:
    """('spec', 'rules', 0, 'paths', 1) -> 'spec.rules[0].paths[1]'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def describe_validation_error(error: ValidationError) -> list[str]:
    """One `field.path: message` line per pydantic error."""
    lines = []
    for err in error.errors(include_url=False):
        loc = list(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == CEL_ERROR_TYPE and ctx.get("field_path"):
            loc.extend(str(ctx["field_path"]).lstrip(".").split("."))
        where = format_location(loc) or "(resource)"
        lines.append(f"{where}: {err['msg']}")
    return lines


@dataclass(frozen=True, slots=True)
class ResourceSet:
    """Every nhigate resource found in a set of files."""

    issuers: tuple[IdentityIssuer, ...] = ()
    services: tuple[ProtectedService, ...] = ()
    grants: tuple[RouteGrant, ...] = ()
    revocations: tuple[Revocation, ...] = ()

    def service(self, name: str | None = None, namespace: str | None = None) -> ProtectedService:
        """The ProtectedService named `name` (optional when there is exactly one)."""
        candidates = [
            s
            for s in self.services
            if (name is None or s.name == name) and (namespace is None or s.namespace == namespace)
        ]
        if len(candidates) == 1:
            return candidates[0]
        known = ", ".join(s.key for s in self.services) or "none"
        if not candidates:
            wanted = name or "any"
            raise ResourceError(f"no ProtectedService {wanted!r} in the resources (found: {known})")
        raise ResourceError(
            f"several ProtectedServices match; choose one with --service (found: {known})"
        )

    def policy_document_for(
        self,
        service_name: str | None,
        now: datetime,
        *,
        namespace: str | None = None,
        issuer_jwks: Mapping[str, Mapping[str, Any]] | None = None,
        drop_expired: bool = True,
    ) -> PolicyDocument:
        """Compile the policy document for one ProtectedService (see `build_policy_document`)."""
        return build_policy_document(
            self.service(service_name, namespace),
            self.issuers,
            self.grants,
            self.revocations,
            now=now,
            issuer_jwks=issuer_jwks,
            drop_expired=drop_expired,
        )


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in YAML_SUFFIXES
            )
            yield from found
        elif path.is_file():
            yield path
        else:
            raise ResourceError(f"{path}: no such file or directory")


def _documents(path: Path) -> list[Any]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ResourceError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResourceError(f"{path}: cannot read: {exc}") from None
    try:
        loaded = [d for d in yaml.load_all(text, Loader=_StringTimestampLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ResourceError(f"{path}: invalid YAML{where}: {problem}") from None
    return [item for document in loaded for item in _list_items(document)]


def _list_items(document: Any) -> list[Any]:
    """A `kind: List` (what `kubectl get -o yaml` writes) stands for its items."""
    if (
        isinstance(document, dict)
        and document.get("kind") == "List"
        and document.get("apiVersion") == "v1"
        and isinstance(document.get("items"), list)
    ):
        return [item for item in document["items"] if item is not None]
    return [document]


def parse_resource(document: Any, where: str) -> Resource | None:
    """Validate one decoded document; None when it is not an nhigate resource."""
    if not isinstance(document, dict):
        raise ResourceError(f"{where}: expected a mapping, got {type(document).__name__}")
    api_version = document.get("apiVersion")
    kind = document.get("kind")
    if not isinstance(api_version, str) or api_version.split("/", 1)[0] != GROUP:
        return None  # e.g. a Namespace or Secret next to the resources: not ours
    metadata = document.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, dict) else None
    label = f"{kind} {raw_name}" if raw_name else f"{kind} (unnamed)"
    if api_version != API_VERSION:
        raise ResourceError(f"{where}: {label}: apiVersion {api_version!r} is not {API_VERSION}")
    model = RESOURCE_BY_KIND.get(kind) if isinstance(kind, str) else None
    if model is None:
        kinds = ", ".join(sorted(RESOURCE_BY_KIND))
        raise ResourceError(f"{where}: unknown kind {kind!r} (expected one of {kinds})")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        lines = describe_validation_error(exc)
        if len(lines) == 1:
            raise ResourceError(f"{where}: {label}: {lines[0]}") from None
        details = "\n".join(f"  {line}" for line in lines)
        raise ResourceError(f"{where}: {label}: {len(lines)} problems:\n{details}") from None


def load_resources(paths: Sequence[Path]) -> ResourceSet:
    """Read YAML files and directories (non-recursive; *.yaml, *.yml, *.json), multi-document.

    Documents of other API groups are ignored; nhigate documents must be
    valid. Two resources with the same kind, namespace and name are an error.
    """
    by_kind: dict[str, list[Resource]] = {kind: [] for kind in RESOURCE_BY_KIND}
    seen: dict[tuple[str, str], str] = {}
    for path in _files(paths):
        documents = _documents(path)
        for index, document in enumerate(documents):
            where = f"{path} (document {index + 1})" if len(documents) > 1 else str(path)
            resource = parse_resource(document, where)
            if resource is None:
                continue
            identity = (resource.kind, resource.key)
            if identity in seen:
                raise ResourceError(
                    f"{where}: {resource.kind} {resource.key} is also defined in {seen[identity]}"
                )
            seen[identity] = where
            by_kind[resource.kind].append(resource)
    return ResourceSet(
        issuers=tuple(r for r in by_kind["IdentityIssuer"] if isinstance(r, IdentityIssuer)),
        services=tuple(r for r in by_kind["ProtectedService"] if isinstance(r, ProtectedService)),
        grants=tuple(r for r in by_kind["RouteGrant"] if isinstance(r, RouteGrant)),
        revocations=tuple(r for r in by_kind["Revocation"] if isinstance(r, Revocation)),
    )
