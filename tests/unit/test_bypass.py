"""Bypass analysis: table-driven cases over plain API-object dicts (no cluster).

The baseline world is namespace `shop` with backend Service `web` (port 80 →
named targetPort `http` = containerPort 8080 on pods `web-0`/`web-1`), the proxy
pods labelled as nhigate labels them, and nhigate's own isolation policy that
admits only the proxy pods to port `http`. Each case adds objects and states
exactly which paths must be found.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from nhigate.api.models import BypassPath
from nhigate.controller.bypass import find_bypass_paths
from nhigate.controller.netpol import (
    format_selector,
    ip_block_is_subset,
    selector_is_subset,
    selector_matches,
)

NS = "shop"
ISOLATION = "nhigate-web-isolation"
PROXY_LABELS = {
    "app.kubernetes.io/name": "nhigate-proxy",
    "app.kubernetes.io/instance": "web",
    "app.kubernetes.io/managed-by": "nhigate",
    "nhigate.io/protected-service": "web",
}
Obj = dict[str, Any]


def pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    base: Obj = {
        "containers": [
            {
                "name": "app",
                "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "metrics", "containerPort": 9100},
                ],
            }
        ]
    }
    base.update(spec)
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels or {"app": "web"}},
        "spec": base,
    }


def service(name: str, selector: dict[str, str] | None = None, **spec: Any) -> Obj:
    body: Obj = {
        "selector": {"app": "web"} if selector is None else selector,
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
    }
    body.update(spec)
    return {"metadata": {"name": name, "namespace": NS}, "spec": body}


def netpol(
    name: str, ingress: list[Obj] | None, pod_selector: Obj | None = None, **spec: Any
) -> Obj:
    body: Obj = {
        "podSelector": {"matchLabels": {"app": "web"}} if pod_selector is None else pod_selector
    }
    if ingress is not None:
        body["ingress"] = ingress
    body.update(spec)
    return {"metadata": {"name": name, "namespace": NS}, "spec": body}


OUR_ISOLATION = netpol(
    ISOLATION,
    [{"from": [{"podSelector": {"matchLabels": PROXY_LABELS}}], "ports": [{"port": "http"}]}],
    policyTypes=["Ingress"],
)
NAMESPACES = [
    {"metadata": {"name": NS, "labels": {"kubernetes.io/metadata.name": NS}}},
    {"metadata": {"name": "monitoring", "labels": {"team": "sre"}}},
]


def analyse(**overrides: Any) -> list[BypassPath]:
    args: dict[str, Any] = {
        "ps_namespace": NS,
        "backend_service": service("web"),
        "backend_pods": [pod("web-0"), pod("web-1")],
        "proxy_pod_labels": PROXY_LABELS,
        "isolation_policy_name": ISOLATION,
        "allow_from": [],
        "network_policies": [OUR_ISOLATION],
        "services": [service("web")],
        "ingresses": [],
        "http_routes": [],
        "namespaces": NAMESPACES,
        "backend_port": 80,
    }
    extra_policies = overrides.pop("extra_policies", [])
    args.update(overrides)
    args["network_policies"] = [*args["network_policies"], *extra_policies]
    return find_bypass_paths(**args)


def rule(peers: list[Obj] | None, ports: list[Obj] | None = None) -> Obj:
    r: Obj = {}
    if peers is not None:
        r["from"] = peers
    if ports is not None:
        r["ports"] = ports
    return r


# (case id, overrides, expected [(kind, namespace, name, reason substring)])
CASES: list[tuple[str, dict[str, Any], list[tuple[str, str, str, str]]]] = [
    ("isolation present and nothing else", {}, []),
    (
        "no isolation at all",
        {"network_policies": []},
        [("NetworkPolicy", NS, ISOLATION, "no NetworkPolicy isolates backend pod(s) web-0, web-1")],
    ),
    (
        "isolation that selects only some backend pods",
        {
            "network_policies": [],
            "extra_policies": [netpol("partial", [], {"matchLabels": {"app": "web", "idx": "0"}})],
            "backend_pods": [pod("web-0", {"app": "web", "idx": "0"}), pod("web-1")],
        },
        [("NetworkPolicy", NS, ISOLATION, "isolates backend pod(s) web-1 for")],
    ),
    (
        "egress-only policy does not isolate ingress",
        {"network_policies": [netpol("egress", None, policyTypes=["Egress"])]},
        [("NetworkPolicy", NS, ISOLATION, "no NetworkPolicy isolates")],
    ),
    (
        "allow-all policy (podSelector {} and an empty rule)",
        {"extra_policies": [netpol("allow-all", [{}], {})]},
        [
            (
                "NetworkPolicy",
                NS,
                "allow-all",
                "allow-all admits every source (an ingress rule with no `from`) to every port "
                "(including 8080/TCP) of the backend pods",
            )
        ],
    ),
    (
        "policy with empty from but the backend port listed",
        {"extra_policies": [netpol("open-http", [rule([], [{"port": 8080}])])]},
        [
            (
                "NetworkPolicy",
                NS,
                "open-http",
                "every source (an ingress rule with no `from`) to port 8080/TCP",
            )
        ],
    ),
    (
        "namespaceSelector {}",
        {"extra_policies": [netpol("all-ns", [rule([{"namespaceSelector": {}}])])]},
        [("NetworkPolicy", NS, "all-ns", "admits all pods in all namespaces to every port")],
    ),
    (
        "podSelector {} admits every pod of the namespace",
        {"extra_policies": [netpol("same-ns", [rule([{"podSelector": {}}], [{"port": "http"}])])]},
        [("NetworkPolicy", NS, "same-ns", "admits all pods in namespace shop to port 8080/TCP")],
    ),
    (
        "ipBlock 0.0.0.0/0",
        {"extra_policies": [netpol("world", [rule([{"ipBlock": {"cidr": "0.0.0.0/0"}}])])]},
        [("NetworkPolicy", NS, "world", "admits IP block 0.0.0.0/0 to every port")],
    ),
    (
        "policy for another port opens no path to the backend port",
        {
            "extra_policies": [
                netpol("metrics", [rule([{"namespaceSelector": {}}], [{"port": 9100}])]),
                netpol("metrics-named", [rule([], [{"port": "metrics"}])]),
                netpol("udp", [rule([], [{"port": 8080, "protocol": "UDP"}])]),
                netpol("range-below", [rule([], [{"port": 7000, "endPort": 8079}])]),
            ]
        },
        [],
    ),
    (
        "endPort range covering the backend port",
        {
            "extra_policies": [
                netpol("range", [rule([{"podSelector": {}}], [{"port": 8000, "endPort": 8100}])])
            ]
        },
        [("NetworkPolicy", NS, "range", "all pods in namespace shop to port 8080/TCP")],
    ),
    (
        "named port in the policy resolves through containerPorts",
        {
            "extra_policies": [
                netpol(
                    "named",
                    [
                        rule(
                            [{"podSelector": {"matchLabels": {"role": "debug"}}}],
                            [{"port": "http"}],
                        )
                    ],
                )
            ]
        },
        [
            (
                "NetworkPolicy",
                NS,
                "named",
                "admits pods matching role=debug in namespace shop to port 8080/TCP",
            )
        ],
    ),
    (
        "numeric targetPort on the Service, named port in the policy",
        {
            "backend_service": service("web", ports=[{"port": 80, "targetPort": 8080}]),
            "extra_policies": [netpol("named", [rule([{"podSelector": {}}], [{"port": "http"}])])],
        },
        [("NetworkPolicy", NS, "named", "port 8080/TCP")],
    ),
    (
        "policy that admits only proxy pods (narrower selector too)",
        {
            "extra_policies": [
                netpol("proxy-only", [rule([{"podSelector": {"matchLabels": PROXY_LABELS}}])]),
                netpol(
                    "proxy-narrower",
                    [rule([{"podSelector": {"matchLabels": {**PROXY_LABELS, "extra": "x"}}}])],
                ),
                netpol(
                    "proxy-by-name-label",
                    [
                        rule(
                            [
                                {
                                    "namespaceSelector": {
                                        "matchLabels": {"kubernetes.io/metadata.name": NS}
                                    },
                                    "podSelector": {"matchLabels": PROXY_LABELS},
                                }
                            ]
                        )
                    ],
                ),
            ]
        },
        [],
    ),
    (
        "proxy labels in every namespace are not the proxy",
        {
            "extra_policies": [
                netpol(
                    "proxy-anywhere",
                    [
                        rule(
                            [
                                {
                                    "namespaceSelector": {},
                                    "podSelector": {"matchLabels": PROXY_LABELS},
                                }
                            ]
                        )
                    ],
                )
            ]
        },
        [("NetworkPolicy", NS, "proxy-anywhere", "protected-service=web in all namespaces")],
    ),
    (
        "a podSelector that is a superset of the proxy labels is not provably the proxy",
        {
            "extra_policies": [
                netpol(
                    "broad",
                    [
                        rule(
                            [
                                {
                                    "podSelector": {
                                        "matchLabels": {"app.kubernetes.io/name": "nhigate-proxy"}
                                    }
                                }
                            ]
                        )
                    ],
                )
            ]
        },
        [("NetworkPolicy", NS, "broad", "pods matching app.kubernetes.io/name=nhigate-proxy")],
    ),
    (
        "matchExpressions on the policy's podSelector (NotIn matches pods without the key)",
        {
            "extra_policies": [
                netpol(
                    "expr",
                    [rule([{"ipBlock": {"cidr": "10.0.0.0/8"}}])],
                    {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]},
                ),
                netpol(
                    "expr-miss",
                    [rule([{"ipBlock": {"cidr": "10.0.0.0/8"}}])],
                    {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
                ),
            ]
        },
        [("NetworkPolicy", NS, "expr", "IP block 10.0.0.0/8")],
    ),
    (
        "matchExpressions on a peer: In a superset of the proxy is a path, Exists too",
        {
            "extra_policies": [
                netpol(
                    "expr-peer",
                    [
                        rule(
                            [
                                {
                                    "podSelector": {
                                        "matchExpressions": [
                                            {
                                                "key": "app.kubernetes.io/name",
                                                "operator": "In",
                                                "values": ["nhigate-proxy", "debug"],
                                            },
                                        ]
                                    }
                                },
                                {
                                    "podSelector": {
                                        "matchExpressions": [{"key": "app", "operator": "Exists"}]
                                    }
                                },
                            ]
                        )
                    ],
                )
            ]
        },
        [
            ("NetworkPolicy", NS, "expr-peer", "app.kubernetes.io/name in (debug,nhigate-proxy)"),
            ("NetworkPolicy", NS, "expr-peer", "pods matching app in namespace shop"),
        ],
    ),
    (
        "allowFrom peers are trusted, broader ones are not",
        {
            "allow_from": [
                {
                    "namespaceSelector": {"matchLabels": {"team": "sre"}},
                    "podSelector": {"matchLabels": {"app": "prometheus"}},
                },
                {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}},
            ],
            "extra_policies": [
                netpol(
                    "scrape",
                    [
                        rule(
                            [
                                {
                                    "namespaceSelector": {"matchLabels": {"team": "sre"}},
                                    "podSelector": {"matchLabels": {"app": "prometheus"}},
                                },
                                {"ipBlock": {"cidr": "10.1.4.0/24"}},
                                {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/23"]}},
                            ]
                        )
                    ],
                ),
                netpol(
                    "scrape-wide",
                    [
                        rule(
                            [
                                {"namespaceSelector": {"matchLabels": {"team": "sre"}}},
                                {"ipBlock": {"cidr": "10.1.0.0/16"}},
                            ]
                        )
                    ],
                ),
            ],
        },
        [
            ("NetworkPolicy", NS, "scrape-wide", "all pods in namespaces matching team=sre"),
            ("NetworkPolicy", NS, "scrape-wide", "IP block 10.1.0.0/16 to"),
        ],
    ),
    (
        "policies in other namespaces do not apply to backend pods",
        {
            "extra_policies": [
                {
                    **netpol("elsewhere", [{}], {}),
                    "metadata": {"name": "elsewhere", "namespace": "other"},
                }
            ]
        },
        [],
    ),
    (
        "tampered isolation policy is analysed like any other",
        {
            "network_policies": [
                netpol(
                    ISOLATION,
                    [rule([{"podSelector": {"matchLabels": PROXY_LABELS}}, {"podSelector": {}}])],
                )
            ]
        },
        [("NetworkPolicy", NS, ISOLATION, "all pods in namespace shop")],
    ),
    (
        "NodePort service selecting backend pods",
        {
            "services": [
                service("web"),
                service("web-np", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
            ]
        },
        [
            (
                "Service",
                NS,
                "web-np",
                "web-np is type NodePort on node port(s) 30080 and selects the backend pods",
            )
        ],
    ),
    (
        "LoadBalancer service selecting backend pods",
        {"services": [service("web"), service("web-lb", type="LoadBalancer")]},
        [("Service", NS, "web-lb", "is type LoadBalancer")],
    ),
    (
        "externalIPs on another service",
        {"services": [service("web"), service("web-ext", externalIPs=["192.0.2.10"])]},
        [("Service", NS, "web-ext", "has externalIPs 192.0.2.10 and selects the backend pods")],
    ),
    (
        "the backend service itself exposed as NodePort",
        {"backend_service": service("web", type="NodePort")},
        [("Service", NS, "web", "the backend Service web is type NodePort")],
    ),
    (
        "ClusterIP alias, a non-matching NodePort and a selector-less NodePort are no path",
        {
            "services": [
                service("web"),
                service("alias"),
                service("other-np", {"app": "other"}, type="NodePort"),
                service("manual-np", {}, type="NodePort"),
                {
                    **service("web-elsewhere", type="NodePort"),
                    "metadata": {"name": "x", "namespace": "other"},
                },
            ]
        },
        [],
    ),
    (
        "Ingress default backend",
        {
            "ingresses": [
                {
                    "metadata": {"name": "ing", "namespace": NS},
                    "spec": {
                        "defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}
                    },
                }
            ]
        },
        [
            (
                "Ingress",
                NS,
                "ing",
                "Ingress ing routes its default backend straight to the backend Service web",
            )
        ],
    ),
    (
        "Ingress rule backend (and one to an alias Service selecting the pods)",
        {
            "services": [service("web"), service("alias")],
            "ingresses": [
                {
                    "metadata": {"name": "ing", "namespace": NS},
                    "spec": {
                        "rules": [
                            {
                                "host": "shop.example",
                                "http": {
                                    "paths": [
                                        {
                                            "path": "/api",
                                            "pathType": "Prefix",
                                            "backend": {
                                                "service": {"name": "web", "port": {"name": "http"}}
                                            },
                                        },
                                        {
                                            "path": "/ui",
                                            "pathType": "Prefix",
                                            "backend": {
                                                "service": {
                                                    "name": "frontend",
                                                    "port": {"number": 80},
                                                }
                                            },
                                        },
                                        {
                                            "path": "/alt",
                                            "pathType": "Prefix",
                                            "backend": {
                                                "service": {"name": "alias", "port": {"number": 80}}
                                            },
                                        },
                                    ]
                                },
                            }
                        ]
                    },
                },
                {
                    "metadata": {"name": "other-ns", "namespace": "other"},
                    "spec": {"defaultBackend": {"service": {"name": "web"}}},
                },
            ],
        },
        [
            ("Ingress", NS, "ing", "routes shop.example/api straight to the backend Service web"),
            (
                "Ingress",
                NS,
                "ing",
                "routes shop.example/alt straight to Service alias, which selects the backend pods",
            ),
        ],
    ),
    (
        "HTTPRoute backendRef same and other namespace, mirror; other kinds ignored",
        {
            "http_routes": [
                {
                    "metadata": {"name": "r1", "namespace": NS},
                    "spec": {"rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
                },
                {
                    "metadata": {"name": "r2", "namespace": "gateway"},
                    "spec": {
                        "rules": [
                            {
                                "backendRefs": [
                                    {"name": "web", "namespace": NS, "kind": "Service", "port": 80}
                                ]
                            }
                        ]
                    },
                },
                {
                    "metadata": {"name": "r3", "namespace": NS},
                    "spec": {
                        "rules": [
                            {
                                "backendRefs": [{"name": "frontend", "port": 80}],
                                "filters": [
                                    {
                                        "type": "RequestMirror",
                                        "requestMirror": {
                                            "backendRef": {"name": "web", "port": 80}
                                        },
                                    }
                                ],
                            }
                        ]
                    },
                },
                {
                    "metadata": {"name": "no-ns", "namespace": "gateway"},
                    "spec": {"rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
                },
                {
                    "metadata": {"name": "bucket", "namespace": NS},
                    "spec": {
                        "rules": [
                            {
                                "backendRefs": [
                                    {"name": "web", "group": "example.io", "kind": "Bucket"}
                                ]
                            }
                        ]
                    },
                },
            ]
        },
        [
            (
                "HTTPRoute",
                NS,
                "r1",
                "r1 sends rule 1 straight to the backend Service web, bypassing the proxy",
            ),
            (
                "HTTPRoute",
                "gateway",
                "r2",
                "cross-namespace: effective when a ReferenceGrant in shop allows it",
            ),
            ("HTTPRoute", NS, "r3", "rule 1 (request mirror)"),
        ],
    ),
    (
        "hostNetwork pod",
        {"backend_pods": [pod("web-0", hostNetwork=True), pod("web-1")]},
        [("Pod", NS, "web-0", "uses hostNetwork")],
    ),
    (
        "hostPort on a container",
        {
            "backend_pods": [
                pod("web-0"),
                pod(
                    "web-1",
                    containers=[
                        {"name": "app", "ports": [{"containerPort": 8080, "hostPort": 80}]}
                    ],
                ),
            ]
        },
        [
            (
                "Pod",
                NS,
                "web-1",
                "container app of backend pod web-1 maps hostPort 80/TCP to container port 8080",
            )
        ],
    ),
    (
        "no backend pods: nothing to reach through NetworkPolicy",
        {"backend_pods": [], "network_policies": []},
        [],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [(o, e) for _, o, e in CASES], ids=[c[0] for c in CASES]
)
def test_bypass_paths(overrides: dict[str, Any], expected: list[tuple[str, str, str, str]]) -> None:
    paths = analyse(**copy.deepcopy(overrides))
    assert len(paths) == len(expected), paths
    for kind, namespace, name, fragment in expected:
        matching = [
            p
            for p in paths
            if (p.kind, p.namespace, p.name) == (kind, namespace, name) and fragment in p.reason
        ]
        assert matching, f"no path {kind} {namespace}/{name} with {fragment!r} in {paths}"


def test_output_is_sorted_deduplicated_and_deterministic() -> None:
    overrides: dict[str, Any] = {
        "network_policies": [],
        "services": [
            service("z-np", type="NodePort"),
            service("a-lb", type="LoadBalancer"),
            service("web"),
        ],
        "backend_pods": [pod("web-1", hostNetwork=True), pod("web-0", hostNetwork=True)],
    }
    first = analyse(**copy.deepcopy(overrides))
    reversed_inputs = copy.deepcopy(overrides)
    reversed_inputs["services"].reverse()
    reversed_inputs["backend_pods"].reverse()
    assert first == analyse(**reversed_inputs)
    assert first == sorted(first, key=lambda p: (p.kind, p.namespace, p.name, p.reason))
    assert len(first) == len(set(first))
    assert [p.kind for p in first] == ["NetworkPolicy", "Pod", "Pod", "Service", "Service"]


def test_two_rules_of_one_policy_merge_into_one_path_per_peer() -> None:
    paths = analyse(
        extra_policies=[
            netpol(
                "twice",
                [
                    rule([{"podSelector": {}}], [{"port": 8080}]),
                    rule([{"podSelector": {}}], [{"port": "http"}]),
                ],
            )
        ]
    )
    assert [p.name for p in paths] == ["twice"]


def test_unknown_backend_port_falls_back_to_every_service_port() -> None:
    two_ports = service(
        "web", ports=[{"port": 80, "targetPort": 8080}, {"port": 9100, "targetPort": "metrics"}]
    )
    metrics_open = [netpol("metrics", [rule([{"podSelector": {}}], [{"port": 9100}])])]
    assert analyse(backend_service=two_ports, extra_policies=metrics_open) == []
    paths = analyse(backend_service=two_ports, extra_policies=metrics_open, backend_port=None)
    assert [(p.name, "9100/TCP" in p.reason) for p in paths] == [("metrics", True)]
    paths = analyse(backend_service=two_ports, extra_policies=metrics_open, backend_port=1234)
    assert [p.name for p in paths] == ["metrics"]


def test_status_entry_shape() -> None:
    path = BypassPath(kind="Service", namespace=NS, name="web-np", reason="why")
    assert path.model_dump() == {
        "kind": "Service",
        "namespace": NS,
        "name": "web-np",
        "reason": "why",
    }


def test_empty_proxy_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="proxy_pod_labels"):
        analyse(proxy_pod_labels={})


# --- label selector semantics -----------------------------------------------------------------


def expr(key: str, op: str, *values: str) -> Obj:
    e: Obj = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({}, {}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [expr("a", "In", "1", "2")]}, {"a": "2"}, True),
        ({"matchExpressions": [expr("a", "In", "1")]}, {}, False),
        ({"matchExpressions": [expr("a", "NotIn", "1")]}, {}, True),
        ({"matchExpressions": [expr("a", "NotIn", "1")]}, {"a": "1"}, False),
        ({"matchExpressions": [expr("a", "Exists")]}, {"a": ""}, True),
        ({"matchExpressions": [expr("a", "Exists")]}, {"b": "1"}, False),
        ({"matchExpressions": [expr("a", "DoesNotExist")]}, {"b": "1"}, True),
        ({"matchExpressions": [expr("a", "DoesNotExist")]}, {"a": "1"}, False),
        ({"matchLabels": {"a": "1"}, "matchExpressions": [expr("b", "Exists")]}, {"a": "1"}, False),
    ],
)
def test_selector_matches(selector: Obj, labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(selector, labels) is matches


def test_unknown_operator_is_an_error() -> None:
    with pytest.raises(ValueError, match="Glob"):
        selector_matches({"matchExpressions": [expr("a", "Glob", "*")]}, {})


@pytest.mark.parametrize(
    ("inner", "outer", "subset"),
    [
        ({}, {}, True),
        ({"matchLabels": {"a": "1"}}, {}, True),
        ({}, {"matchLabels": {"a": "1"}}, False),
        ({"matchLabels": {"a": "1", "b": "2"}}, {"matchLabels": {"a": "1"}}, True),
        ({"matchExpressions": [expr("a", "In", "1", "2")]}, {"matchLabels": {"a": "1"}}, False),
        ({"matchLabels": {"a": "1"}}, {"matchExpressions": [expr("a", "In", "1", "2")]}, True),
        ({"matchLabels": {"a": "1"}}, {"matchExpressions": [expr("a", "Exists")]}, True),
        ({"matchLabels": {"a": "1"}}, {"matchExpressions": [expr("a", "NotIn", "2")]}, True),
        ({"matchLabels": {"a": "2"}}, {"matchExpressions": [expr("a", "NotIn", "2")]}, False),
        (
            {"matchExpressions": [expr("a", "NotIn", "1", "2")]},
            {"matchExpressions": [expr("a", "NotIn", "2")]},
            True,
        ),
        (
            {"matchExpressions": [expr("a", "DoesNotExist")]},
            {"matchExpressions": [expr("a", "NotIn", "2")]},
            True,
        ),
        ({"matchExpressions": [expr("a", "Exists")]}, {"matchLabels": {"a": "1"}}, False),
        (
            {"matchExpressions": [expr("a", "DoesNotExist")]},
            {"matchExpressions": [expr("a", "DoesNotExist")]},
            True,
        ),
        ({"matchExpressions": [expr("a", "In")]}, {"matchLabels": {"z": "9"}}, True),
    ],
)
def test_selector_is_subset(inner: Obj, outer: Obj, subset: bool) -> None:
    assert selector_is_subset(inner, outer) is subset


@pytest.mark.parametrize(
    ("inner", "outer", "subset"),
    [
        ({"cidr": "10.1.4.0/24"}, {"cidr": "10.1.0.0/16"}, True),
        ({"cidr": "10.0.0.0/8"}, {"cidr": "10.1.0.0/16"}, False),
        ({"cidr": "10.1.2.0/24"}, {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}, False),
        (
            {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/23"]},
            {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]},
            True,
        ),
        (
            {"cidr": "10.1.0.0/16", "except": ["10.1.3.0/24"]},
            {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]},
            False,
        ),
        ({"cidr": "2001:db8::/64"}, {"cidr": "0.0.0.0/0"}, False),
        ({"cidr": "2001:db8::/64"}, {"cidr": "2001:db8::/32"}, True),
        ({"cidr": "not-a-cidr"}, {"cidr": "0.0.0.0/0"}, False),
    ],
)
def test_ip_block_is_subset(inner: Obj, outer: Obj, subset: bool) -> None:
    assert ip_block_is_subset(inner, outer) is subset


def test_format_selector_reads_like_kubectl() -> None:
    selector = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            expr("tier", "In", "b", "a"),
            expr("x", "NotIn", "1"),
            expr("y", "Exists"),
            expr("z", "DoesNotExist"),
        ],
    }
    assert format_selector(selector) == "app=web,tier in (a,b),x notin (1),y,!z"
    assert format_selector({}) == "<everything>"
