"""Kubernetes label-selector and NetworkPolicy semantics, as pure functions.

Everything here works on plain dicts shaped like the Kubernetes API objects
(`metav1.LabelSelector`, `networking.k8s.io/v1` NetworkPolicy pieces), so the
bypass analysis can be unit-tested without a cluster. The rules follow the
Kubernetes API reference:

* a label selector's `matchLabels` and `matchExpressions` are ANDed; an empty
  selector matches everything; `NotIn` and `DoesNotExist` match objects that do
  not carry the key at all;
* a NetworkPolicy without `policyTypes` is an Ingress policy (plus Egress when
  it has an `egress` section);
* an ingress rule with no `from` admits every source and with no `ports` admits
  every port; a port entry's `protocol` defaults to TCP, a missing `port` means
  every port of that protocol, a named `port` is resolved through the
  destination pod's `containerPorts`, and `endPort` makes a numeric range.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""Label the API server sets (immutably) on every Namespace to its own name."""

_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: `key operator values`."""

    key: str
    operator: str
    values: frozenset[str]


def selector_requirements(selector: Mapping[str, Any]) -> list[Requirement]:
    """Flatten a LabelSelector into its ANDed requirements.

    `matchLabels` entries become `In` with one value. Raises `ValueError` for an
    operator the API server would have rejected (fail loudly rather than guess).
    """
    reqs = [
        Requirement(str(k), "In", frozenset({str(v)}))
        for k, v in (selector.get("matchLabels") or {}).items()
    ]
    for expr in selector.get("matchExpressions") or []:
        op = expr.get("operator")
        if op not in _OPERATORS:
            raise ValueError(f"unknown label selector operator {op!r}")
        values = frozenset(str(v) for v in expr.get("values") or [])
        reqs.append(Requirement(str(expr.get("key", "")), str(op), values))
    return reqs


def _requirement_matches(req: Requirement, labels: Mapping[str, str]) -> bool:
    present = req.key in labels
    if req.operator == "In":
        return present and labels[req.key] in req.values
    if req.operator == "NotIn":
        return not present or labels[req.key] not in req.values
    if req.operator == "Exists":
        return present
    return not present  # DoesNotExist


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """True when `labels` satisfy the LabelSelector (an empty selector matches all)."""
    return all(_requirement_matches(r, labels) for r in selector_requirements(selector))


def _implies(inner: Requirement, outer: Requirement) -> bool:
    """True when every label set satisfying `inner` satisfies `outer` (same key)."""
    if outer.operator == "In":
        return inner.operator == "In" and inner.values <= outer.values
    if outer.operator == "NotIn":
        if inner.operator == "In":
            return not (inner.values & outer.values)
        if inner.operator == "NotIn":
            return outer.values <= inner.values
        return inner.operator == "DoesNotExist"
    if outer.operator == "Exists":
        return (inner.operator == "In" and bool(inner.values)) or inner.operator == "Exists"
    return inner.operator == "DoesNotExist"


def _unsatisfiable(reqs: Sequence[Requirement]) -> bool:
    """Detect the obvious contradictions (e.g. `In ()`), which select nothing."""
    return any(r.operator == "In" and not r.values for r in reqs)


def selector_is_subset(inner: Mapping[str, Any], outer: Mapping[str, Any]) -> bool:
    """True when it is provable that everything `inner` selects, `outer` selects too.

    Conservative: each requirement of `outer` must be implied by one requirement
    of `inner` on the same key. `False` means "not provable", not "disjoint".
    """
    inner_reqs = selector_requirements(inner)
    if _unsatisfiable(inner_reqs):
        return True
    return all(
        any(i.key == o.key and _implies(i, o) for i in inner_reqs)
        for o in selector_requirements(outer)
    )


def format_selector(selector: Mapping[str, Any]) -> str:
    """Render a LabelSelector the way `kubectl` does (`a=b,c in (d,e),!f`)."""
    parts: list[str] = []
    for r in selector_requirements(selector):
        values = ",".join(sorted(r.values))
        if r.operator == "In":
            parts.append(f"{r.key}={values}" if len(r.values) == 1 else f"{r.key} in ({values})")
        elif r.operator == "NotIn":
            parts.append(f"{r.key} notin ({values})")
        elif r.operator == "Exists":
            parts.append(r.key)
        else:
            parts.append(f"!{r.key}")
    return ",".join(parts) or "<everything>"


def namespace_labels(name: str, namespaces: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Labels of Namespace `name` from `namespaces`; a missing one gets only its name label."""
    for ns in namespaces:
        meta = ns.get("metadata") or {}
        if meta.get("name") == name:
            labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
            labels.setdefault(NAMESPACE_NAME_LABEL, name)
            return labels
    return {NAMESPACE_NAME_LABEL: name}


def governs_ingress(policy: Mapping[str, Any]) -> bool:
    """True when the NetworkPolicy governs Ingress (explicitly or by default)."""
    spec = policy.get("spec") or {}
    types = spec.get("policyTypes")
    if not types:  # absent: Ingress is always implied
        return True
    return "Ingress" in types


def policy_selects(policy: Mapping[str, Any], namespace: str, labels: Mapping[str, str]) -> bool:
    """True when the NetworkPolicy governs Ingress of a pod with `labels` in `namespace`."""
    meta = policy.get("metadata") or {}
    if meta.get("namespace") != namespace or not governs_ingress(policy):
        return False
    return selector_matches((policy.get("spec") or {}).get("podSelector") or {}, labels)


def container_port_number(pod: Mapping[str, Any], name: str, protocol: str) -> int | None:
    """Resolve a named port through the pod's `containerPorts`; `None` when no container has it."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for cp in container.get("ports") or []:
            if cp.get("name") == name and (cp.get("protocol") or "TCP") == protocol:
                number = cp.get("containerPort")
                return int(number) if number is not None else None
    return None


def port_entry_matches(
    entry: Mapping[str, Any], pod: Mapping[str, Any], port: int | None, protocol: str
) -> bool:
    """True when one NetworkPolicyPort admits `port`/`protocol` on `pod`.

    `port=None` means the destination port is unknown: any entry of the right
    protocol is taken to match (fail closed: report rather than miss a path).
    """
    if (entry.get("protocol") or "TCP") != protocol:
        return False
    wanted = entry.get("port")
    if wanted is None or port is None:
        return True
    if isinstance(wanted, str) and not wanted.isdigit():
        return container_port_number(pod, wanted, protocol) == port
    start = int(wanted)
    end = entry.get("endPort")
    return start <= port <= int(end) if end is not None else start == port


def rule_admits_port(
    rule: Mapping[str, Any], pod: Mapping[str, Any], port: int | None, protocol: str
) -> bool:
    """True when an ingress rule's `ports` (empty = every port) admit `port` on `pod`."""
    entries = rule.get("ports") or []
    if not entries:
        return True
    return any(port_entry_matches(e, pod, port, protocol) for e in entries)


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None


def _net_within(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def ip_block_is_subset(inner: Mapping[str, Any], outer: Mapping[str, Any]) -> bool:
    """True when every address IPBlock `inner` admits, IPBlock `outer` admits too.

    `inner.cidr` must sit inside `outer.cidr`, and every `outer.except` range that
    overlaps `inner` must be covered by one of `inner.except`. Unparseable → False.
    """
    inner_net, outer_net = (
        _network(str(inner.get("cidr", ""))),
        _network(str(outer.get("cidr", ""))),
    )
    if inner_net is None or outer_net is None or not _net_within(inner_net, outer_net):
        return False
    inner_except = [_network(str(c)) for c in inner.get("except") or []]
    for raw in outer.get("except") or []:
        hole = _network(str(raw))
        if hole is None:
            return False
        if hole.version != inner_net.version or not hole.overlaps(inner_net):
            continue
        overlap = hole if _net_within(hole, inner_net) else inner_net
        if not any(e is not None and _net_within(overlap, e) for e in inner_except):
            return False
    return True
