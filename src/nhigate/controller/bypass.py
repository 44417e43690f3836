"""Bypass analysis: every direct path to a protected backend that skips the proxy.

A pure function over plain API-object dicts (what a watch or list returns), so
it is unit-tested without a cluster and the controller only gathers objects and
writes the result into `status.bypassPaths`. The semantics are written down in
docs/bypass-detection.md; the short version:

* NetworkPolicies are additive. A backend pod that no Ingress policy selects is
  open to everything. Otherwise every ingress rule of every policy selecting it
  opens its peers on its ports; a peer is harmless only when it is provably a
  subset of the proxy pods or of an `isolation.allowFrom` peer.
* NodePort / LoadBalancer / externalIPs Services selecting the backend pods,
  Ingresses and HTTPRoutes routing to the backend Service (or to another Service
  selecting the backend pods), and backend pods on hostNetwork or with a
  hostPort are paths regardless of NetworkPolicy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nhigate.api.models import BypassPath
from nhigate.controller.netpol import (
    NAMESPACE_NAME_LABEL,
    container_port_number,
    format_selector,
    ip_block_is_subset,
    namespace_labels,
    policy_selects,
    rule_admits_port,
    selector_is_subset,
    selector_matches,
)

Obj = Mapping[str, Any]

_EXPOSED_SERVICE_TYPES = frozenset({"NodePort", "LoadBalancer"})
_NODE_SNAT_NOTE = (
    "traffic arriving on node addresses is forwarded by kube-proxy and, depending on "
    "the CNI and externalTrafficPolicy, may be source-NATed to a node IP that "
    "pod-selector NetworkPolicies do not recognise"
)


def _path(kind: str, namespace: str, name: str, reason: str) -> BypassPath:
    """One `status.bypassPaths[]` entry: `name` is the object that opens the path (for a
    missing isolation, the isolation policy nhigate expects); `reason` is stable across pod
    restarts where possible."""
    return BypassPath(kind=kind, namespace=namespace, name=name, reason=reason)


def _order(path: BypassPath) -> tuple[str, str, str, str]:
    return (path.kind, path.namespace, path.name, path.reason)


def _meta(obj: Obj) -> Obj:
    meta: Obj = obj.get("metadata") or {}
    return meta


def _spec(obj: Obj) -> Obj:
    spec: Obj = obj.get("spec") or {}
    return spec


def _labels(obj: Obj) -> dict[str, str]:
    return {str(k): str(v) for k, v in (_meta(obj).get("labels") or {}).items()}


def _name_list(names: Iterable[str], limit: int = 3) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    return shown if len(ordered) <= limit else f"{shown} and {len(ordered) - limit} more"


# --- peers ----------------------------------------------------------------------------


def _peer_scope(peer: Obj) -> tuple[Obj | None, Obj]:
    """(namespaceSelector or None for "the policy's namespace", podSelector)."""
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None and pod_sel is None:  # not valid in the API; read as "everything"
        return {}, {}
    return ns_sel, pod_sel or {}


def _namespaces_within(
    inner: Obj | None,
    inner_ns: str,
    outer: Obj | None,
    outer_ns: str,
    namespaces: Sequence[Obj],
) -> bool:
    if inner is None and outer is None:
        return inner_ns == outer_ns
    if inner is None:  # one namespace, judged by its current labels (as the CNI does)
        assert outer is not None
        return selector_matches(outer, namespace_labels(inner_ns, namespaces))
    if outer is None:  # a selector is within one namespace only via its immutable name label
        return selector_is_subset(inner, {"matchLabels": {NAMESPACE_NAME_LABEL: outer_ns}})
    return selector_is_subset(inner, outer)


def _peer_within(
    peer: Obj, peer_ns: str, trusted: Obj, trusted_ns: str, namespaces: Sequence[Obj]
) -> bool:
    """True when peer `peer` (in a policy of `peer_ns`) is provably inside `trusted`."""
    if "ipBlock" in peer or "ipBlock" in trusted:
        inner, outer = peer.get("ipBlock"), trusted.get("ipBlock")
        return inner is not None and outer is not None and ip_block_is_subset(inner, outer)
    p_ns, p_pods = _peer_scope(peer)
    t_ns, t_pods = _peer_scope(trusted)
    return _namespaces_within(p_ns, peer_ns, t_ns, trusted_ns, namespaces) and selector_is_subset(
        p_pods, t_pods
    )


def _describe_peer(peer: Obj, policy_ns: str) -> str:
    block = peer.get("ipBlock")
    if block is not None:
        text = f"IP block {block.get('cidr', '?')}"
        excepts = block.get("except") or []
        return f"{text} (except {', '.join(map(str, excepts))})" if excepts else text
    ns_sel, pod_sel = _peer_scope(peer)
    pods = "all pods" if not _has_terms(pod_sel) else f"pods matching {format_selector(pod_sel)}"
    if ns_sel is None:
        return f"{pods} in namespace {policy_ns}"
    if not _has_terms(ns_sel):
        return f"{pods} in all namespaces"
    return f"{pods} in namespaces matching {format_selector(ns_sel)}"


def _has_terms(selector: Obj) -> bool:
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


# --- backend ports --------------------------------------------------------------------


def _backend_service_ports(service: Obj, backend_port: int | None) -> list[Obj]:
    ports: list[Obj] = list(_spec(service).get("ports") or [])
    chosen = [p for p in ports if backend_port is None or p.get("port") == backend_port]
    return chosen or ports  # an unknown port: consider them all (fail closed)


def _pod_target_ports(pod: Obj, service_ports: Sequence[Obj]) -> list[tuple[int | None, str]]:
    """The (port, protocol) pairs the backend Service sends to on this pod; None = unknown."""
    if not service_ports:
        return [(None, "TCP")]
    result: list[tuple[int | None, str]] = []
    for sp in service_ports:
        protocol = str(sp.get("protocol") or "TCP")
        target = sp.get("targetPort", sp.get("port"))
        if isinstance(target, str) and not target.isdigit():
            result.append((container_port_number(pod, target, protocol), protocol))
        else:
            result.append((int(target) if target is not None else None, protocol))
    return result


def _port_label(port: int | None, protocol: str) -> str:
    return f"{port if port is not None else '?'}/{protocol}"


# --- the analysis ---------------------------------------------------------------------


def _network_policy_paths(
    *,
    ps_namespace: str,
    pods: Sequence[Obj],
    service_ports: Sequence[Obj],
    trusted_peers: Sequence[Obj],
    isolation_policy_name: str,
    network_policies: Sequence[Obj],
    namespaces: Sequence[Obj],
) -> list[BypassPath]:
    unisolated: list[str] = []
    # (policy name, peer description) -> (admitted backend ports, rule had no `ports`)
    opened: dict[tuple[str, str], tuple[set[str], bool]] = {}
    policies = sorted(
        (p for p in network_policies if _meta(p).get("namespace") == ps_namespace),
        key=lambda p: str(_meta(p).get("name", "")),
    )
    for pod in pods:
        labels = _labels(pod)
        selecting = [p for p in policies if policy_selects(p, ps_namespace, labels)]
        if not selecting:
            unisolated.append(str(_meta(pod).get("name", "")))
            continue
        targets = _pod_target_ports(pod, service_ports)
        for policy in selecting:
            policy_name = str(_meta(policy).get("name", ""))
            for rule in _spec(policy).get("ingress") or []:
                admitted = {
                    _port_label(p, proto)
                    for p, proto in targets
                    if rule_admits_port(rule, pod, p, proto)
                }
                if not admitted:
                    continue
                peers = rule.get("from") or []
                if not peers:
                    offending = ["every source (an ingress rule with no `from`)"]
                else:
                    offending = [
                        _describe_peer(peer, ps_namespace)
                        for peer in peers
                        if not any(
                            _peer_within(peer, ps_namespace, t, ps_namespace, namespaces)
                            for t in trusted_peers
                        )
                    ]
                all_ports = not rule.get("ports")
                for description in offending:
                    ports, was_all = opened.setdefault((policy_name, description), (set(), False))
                    ports.update(admitted)
                    opened[(policy_name, description)] = (ports, was_all or all_ports)

    paths: list[BypassPath] = []
    if unisolated:
        paths.append(
            _path(
                "NetworkPolicy",
                ps_namespace,
                isolation_policy_name,
                f"no NetworkPolicy isolates backend pod(s) {_name_list(unisolated)} for Ingress, "
                "so every pod, node and external address that can route to them reaches them "
                "directly",
            )
        )
    for (policy_name, description), (ports, all_ports) in opened.items():
        port_text = ", ".join(sorted(ports))
        where = f"every port (including {port_text})" if all_ports else f"port {port_text}"
        paths.append(
            _path(
                "NetworkPolicy",
                ps_namespace,
                policy_name,
                f"NetworkPolicy {policy_name} admits {description} to {where} of the backend pods",
            )
        )
    return paths


def _selects_any(service: Obj, pods: Sequence[Obj]) -> bool:
    selector = _spec(service).get("selector") or {}
    if not selector:  # no selector: endpoints are managed by hand, not by label
        return False
    return any(all(_labels(p).get(k) == v for k, v in selector.items()) for p in pods)


def _service_exposure(service: Obj, is_backend: bool) -> BypassPath | None:
    spec = _spec(service)
    name = str(_meta(service).get("name", ""))
    exposures: list[str] = []
    svc_type = str(spec.get("type") or "ClusterIP")
    if svc_type in _EXPOSED_SERVICE_TYPES:
        node_ports = sorted(
            str(p["nodePort"]) for p in spec.get("ports") or [] if p.get("nodePort")
        )
        ports = f" on node port(s) {', '.join(node_ports)}" if node_ports else ""
        exposures.append(f"is type {svc_type}{ports}")
    external = [str(ip) for ip in spec.get("externalIPs") or []]
    if external:
        exposures.append(f"has externalIPs {', '.join(external)}")
    if not exposures:
        return None
    subject = f"the backend Service {name}" if is_backend else f"Service {name}"
    verb = "" if is_backend else " and selects the backend pods"
    return _path(
        "Service",
        str(_meta(service).get("namespace", "")),
        name,
        f"{subject} {' and '.join(exposures)}{verb}: reachable from outside the cluster "
        f"without the proxy; {_NODE_SNAT_NOTE}",
    )


def _service_paths(
    ps_namespace: str, backend_service: Obj, pods: Sequence[Obj], services: Sequence[Obj]
) -> tuple[list[BypassPath], dict[str, str]]:
    """Exposure paths, plus {service name: how it reaches the pods} for route analysis."""
    backend_name = str(_meta(backend_service).get("name", ""))
    targets = {backend_name: f"the backend Service {backend_name}"}
    paths: list[BypassPath] = []
    exposed = _service_exposure(backend_service, is_backend=True)
    if exposed:
        paths.append(exposed)
    for service in services:
        name = str(_meta(service).get("name", ""))
        if _meta(service).get("namespace") != ps_namespace or name == backend_name:
            continue
        if not _selects_any(service, pods):
            continue
        targets[name] = f"Service {name}, which selects the backend pods"
        exposed = _service_exposure(service, is_backend=False)
        if exposed:
            paths.append(exposed)
    return paths, targets


def _ingress_paths(
    ps_namespace: str, targets: Mapping[str, str], ingresses: Sequence[Obj]
) -> list[BypassPath]:
    paths: list[BypassPath] = []
    for ingress in ingresses:
        if _meta(ingress).get("namespace") != ps_namespace:
            continue  # Ingress backends are always in the Ingress's own namespace
        spec = _spec(ingress)
        hits: dict[str, list[str]] = {}
        default = ((spec.get("defaultBackend") or {}).get("service") or {}).get("name")
        if default in targets:
            hits.setdefault(str(default), []).append("its default backend")
        for rule in spec.get("rules") or []:
            host = rule.get("host") or "*"
            for http_path in (rule.get("http") or {}).get("paths") or []:
                svc = ((http_path.get("backend") or {}).get("service") or {}).get("name")
                if svc in targets:
                    hits.setdefault(str(svc), []).append(f"{host}{http_path.get('path') or '/'}")
        name = str(_meta(ingress).get("name", ""))
        for svc, where in sorted(hits.items()):
            paths.append(
                _path(
                    "Ingress",
                    ps_namespace,
                    name,
                    f"Ingress {name} routes {_name_list(where)} straight to {targets[svc]}, "
                    "bypassing the proxy",
                )
            )
    return paths


def _route_refs(route: Obj) -> list[tuple[str, Obj]]:
    """(where, backendRef-shaped object) for every backend and mirror reference of an HTTPRoute."""
    refs: list[tuple[str, Obj]] = []
    for i, rule in enumerate(_spec(route).get("rules") or [], start=1):
        filters: list[Obj] = list(rule.get("filters") or [])
        for ref in rule.get("backendRefs") or []:
            refs.append((f"rule {i}", ref))
            filters.extend(ref.get("filters") or [])
        for flt in filters:
            mirror = (flt.get("requestMirror") or {}).get("backendRef")
            if mirror:
                refs.append((f"rule {i} (request mirror)", mirror))
    return refs


def _http_route_paths(
    ps_namespace: str, targets: Mapping[str, str], http_routes: Sequence[Obj]
) -> list[BypassPath]:
    paths: list[BypassPath] = []
    for route in http_routes:
        route_ns = str(_meta(route).get("namespace", ""))
        name = str(_meta(route).get("name", ""))
        hits: dict[str, list[str]] = {}
        for where, ref in _route_refs(route):
            if (ref.get("group") or "") != "" or (ref.get("kind") or "Service") != "Service":
                continue
            if (ref.get("namespace") or route_ns) != ps_namespace or ref.get("name") not in targets:
                continue
            hits.setdefault(str(ref["name"]), []).append(where)
        for svc, wheres in sorted(hits.items()):
            cross = (
                f" (cross-namespace: effective when a ReferenceGrant in {ps_namespace} allows it)"
                if route_ns != ps_namespace
                else ""
            )
            paths.append(
                _path(
                    "HTTPRoute",
                    route_ns,
                    name,
                    f"HTTPRoute {name} sends {_name_list(wheres)} straight to {targets[svc]}, "
                    f"bypassing the proxy{cross}",
                )
            )
    return paths


def _pod_paths(ps_namespace: str, pods: Sequence[Obj]) -> list[BypassPath]:
    paths: list[BypassPath] = []
    for pod in pods:
        name = str(_meta(pod).get("name", ""))
        spec = _spec(pod)
        if spec.get("hostNetwork"):
            paths.append(
                _path(
                    "Pod",
                    ps_namespace,
                    name,
                    f"backend pod {name} uses hostNetwork: it listens on its node's addresses "
                    "and NetworkPolicies do not apply to it",
                )
            )
        containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        for container in containers:
            for cp in container.get("ports") or []:
                if cp.get("hostPort"):
                    paths.append(
                        _path(
                            "Pod",
                            ps_namespace,
                            name,
                            f"container {container.get('name', '?')} of backend pod {name} maps "
                            f"hostPort {cp['hostPort']}/{cp.get('protocol') or 'TCP'} to "
                            f"container port {cp.get('containerPort')}: reachable on its node's "
                            f"addresses; {_NODE_SNAT_NOTE}",
                        )
                    )
    return paths


def find_bypass_paths(
    *,
    ps_namespace: str,
    backend_service: Obj,
    backend_pods: Sequence[Obj],
    proxy_pod_labels: Mapping[str, str],
    isolation_policy_name: str,
    allow_from: Sequence[Obj],
    network_policies: Sequence[Obj],
    services: Sequence[Obj],
    ingresses: Sequence[Obj],
    http_routes: Sequence[Obj],
    namespaces: Sequence[Obj],
    backend_port: int | None = None,
) -> list[BypassPath]:
    """Every direct path to the backend pods that does not go through the proxy, sorted.

    `backend_pods` are the pods the backend Service selects (others in the list,
    e.g. from another namespace, are ignored). `backend_port` is the Service port
    the ProtectedService fronts (`spec.backend.port`); `None` (or a port the
    Service does not have) means every port of the backend Service. `allow_from`
    is `spec.isolation.allowFrom`: peers the user trusts alongside the proxy pods.
    Raises `ValueError` for empty `proxy_pod_labels` (would trust every pod) and
    for label-selector operators the API server would have rejected.
    """
    if not proxy_pod_labels:
        raise ValueError("proxy_pod_labels must not be empty: it would trust every pod")
    pods = sorted(
        (p for p in backend_pods if _meta(p).get("namespace", ps_namespace) == ps_namespace),
        key=lambda p: str(_meta(p).get("name", "")),
    )
    trusted: list[Obj] = [{"podSelector": {"matchLabels": dict(proxy_pod_labels)}}, *allow_from]
    paths = _network_policy_paths(
        ps_namespace=ps_namespace,
        pods=pods,
        service_ports=_backend_service_ports(backend_service, backend_port),
        trusted_peers=trusted,
        isolation_policy_name=isolation_policy_name,
        network_policies=network_policies,
        namespaces=namespaces,
    )
    service_paths, targets = _service_paths(ps_namespace, backend_service, pods, services)
    paths += service_paths
    paths += _ingress_paths(ps_namespace, targets, ingresses)
    paths += _http_route_paths(ps_namespace, targets, http_routes)
    paths += _pod_paths(ps_namespace, pods)
    return sorted(set(paths), key=_order)
