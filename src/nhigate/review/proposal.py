"""The tightened RouteGrant: today's grant cut down to what the window used.

Built only from today's rules, methods, path patterns and subjects, each kept, removed
or replaced by narrower ones, so the proposal never allows what today's grant does not;
and every path pattern is `PathShapes.patterns()`, which covers every observed path, so
it denies nothing the window's audit shows allowed (tests/unit/test_review_invariant.py).
Times, tenant, rate limit and reason are kept as they are.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import yaml

from nhigate.api.models import Method, RouteGrant
from nhigate.review.findings import seen_subjects
from nhigate.review.usage import GrantUsage

MAX_PATHS_PER_RULE = 32
MAX_RULES = 128
"""The CRD's limits (RouteRule.paths, RouteGrantSpec.rules)."""

_METHODS = frozenset(m.value for m in Method)
_KEPT_METADATA = ("name", "namespace", "labels", "annotations")
_NOISY_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def narrowed_patterns(usage: GrantUsage) -> list[list[list[str]]]:
    """Per rule, per path pattern: the narrowest patterns covering the paths it matched
    (for any method; empty when unused)."""
    result: list[list[list[str]]] = []
    for rule, rule_usage in zip(usage.grant.rules, usage.rules, strict=True):
        per_path: list[list[str]] = []
        for position in range(len(rule.paths)):
            found: set[str] = set()
            for (p, _method), shapes in rule_usage.shapes.items():
                if p == position:
                    found.update(shapes.patterns())
            per_path.append(sorted(found))
        result.append(per_path)
    return result


def _rule_manifests(usage: GrantUsage, today: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for rule, rule_usage, manifest in zip(usage.grant.rules, usage.rules, today, strict=True):
        if rule.mcp is not None:
            if usage.mcp_requests:
                rules.append(manifest)  # MCP rules are kept whole, never narrowed
            continue
        by_paths: dict[tuple[str, ...], set[str]] = {}
        for method in rule_usage.methods:
            covering: set[str] = set()
            for (_p, m), shapes in rule_usage.shapes.items():
                if m == method:
                    covering.update(shapes.patterns())
            by_paths.setdefault(tuple(sorted(covering)), set()).add(method)
        # A method the CRD cannot name was allowed by `*`: keep `*` for it.
        grouped = sorted(
            (sorted(methods) if methods <= _METHODS else ["*"], list(paths))
            for paths, methods in by_paths.items()
        )
        for listed, paths in grouped:
            for start in range(0, len(paths), MAX_PATHS_PER_RULE):
                chunk = paths[start : start + MAX_PATHS_PER_RULE]
                rules.append({"methods": listed, "paths": chunk})
    return rules


def _metadata(grant: RouteGrant) -> dict[str, Any]:
    metadata = grant.manifest()["metadata"]
    kept = {k: metadata[k] for k in _KEPT_METADATA if metadata.get(k)}
    annotations = {
        k: v for k, v in kept.get("annotations", {}).items() if k not in _NOISY_ANNOTATIONS
    }
    if annotations:
        kept["annotations"] = annotations
    else:
        kept.pop("annotations", None)
    return kept


def today_manifest(grant: RouteGrant) -> dict[str, Any]:
    """Today's grant as it would be applied (no status, no server-set metadata)."""
    manifest = grant.manifest()
    manifest["metadata"] = _metadata(grant)
    return manifest


def propose(grant: RouteGrant, usage: GrantUsage) -> dict[str, Any] | None:
    """The tightened manifest, or None when nothing of the grant was used (delete it)."""
    today = today_manifest(grant)
    spec = today["spec"]
    rules = _rule_manifests(usage, spec["rules"])
    if not rules:
        return None
    if len(rules) > MAX_RULES:
        rules = spec["rules"]  # more distinct shapes than a grant may hold: keep today's
    seen = seen_subjects(usage)
    subjects = [s for s, used in zip(spec["subjects"], seen, strict=True) if used]
    proposed = {**today, "spec": {**spec, "subjects": subjects or spec["subjects"]}}
    proposed["spec"]["rules"] = rules
    return proposed


def to_yaml(manifest: dict[str, Any]) -> str:
    """A manifest as YAML for `kubectl apply -f`."""
    text: str = yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
    return text


def diff(today: dict[str, Any], proposed: dict[str, Any] | None, name: str) -> str:
    """A unified diff from today's grant to the proposal (deletion when None)."""
    before = to_yaml(today).splitlines(keepends=True)
    after = to_yaml(proposed).splitlines(keepends=True) if proposed is not None else []
    return "".join(
        difflib.unified_diff(before, after, fromfile=f"today/{name}", tofile=f"proposed/{name}")
    )
