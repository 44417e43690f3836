"""The pure MCP and delegation policy: document encoding, decisions, explain, who-can."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from nhigate.api.compile import build_policy_document, undeclared_mcp_endpoints
from nhigate.api.models import ProtectedService, RouteGrant
from nhigate.policy import (
    Delegation,
    Facts,
    Grant,
    Identity,
    IdentityKind,
    McpRule,
    Policy,
    PolicyDocumentError,
    Reason,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    decide,
    decode_document,
    encode_document,
    make_document,
)
from nhigate.policy.index import chain_verdict
from nhigate.policy.mcp import (
    McpKind,
    decide_mcp,
    explain_mcp,
    mcp_endpoint_of,
    who_can_mcp,
)
from nhigate.policy.names import name_matches

SERVICE = ServiceConfig("ns", "svc", "api", 80, mcp_endpoints=("/mcp", "/other-mcp"))
NOW = 1_800_000_000.0


def token(sub: str, actors: tuple[str, ...] = ()) -> Identity:
    return Identity(kind=IdentityKind.JWT, issuer="iss", subject=sub, actors=actors)


def mcp_grant(name: str, sub: str, rule: McpRule, **kw: object) -> Grant:
    delegation = kw.pop("delegation", None)
    assert delegation is None or isinstance(delegation, Delegation)
    return Grant(
        name=name,
        subjects=(TokenSubject("iss", sub, (), delegation),),
        rules=(Rule(frozenset(), (), rule),),
        **kw,  # type: ignore[arg-type]
    )


GRANTS = (
    mcp_grant("ns/agent", "agent", McpRule(tools=("get_*", "search"), resources=("file:///d/*",))),
    mcp_grant("ns/other", "agent", McpRule(endpoints=("/other-mcp",), prompts=("p1",))),
    mcp_grant("ns/expired", "late", McpRule(tools=("x",)), expires_at=NOW - 1),
    Grant("ns/http", (TokenSubject("iss", "agent"),), (Rule(frozenset({"*"}), ("/**",)),)),
)


def policy(grants: tuple[Grant, ...] = GRANTS, service: ServiceConfig = SERVICE) -> Policy:
    return compile_policy(make_document(service, (), grants, ()))


def test_documents_round_trip_mcp_rules_delegation_and_endpoints() -> None:
    delegated = mcp_grant(
        "ns/d", "alice", McpRule(tools=("b", "a", "a")), delegation=Delegation(("z", "y"), 2, True)
    )
    doc = make_document(SERVICE, (), (*GRANTS, delegated), ())
    again = decode_document(encode_document(doc))
    assert again == doc
    by_name = {g.name: g for g in again.grants}
    assert by_name["ns/d"].rules[0].mcp == McpRule(tools=("a", "b"))  # canonical: sorted, unique
    subject = by_name["ns/d"].subjects[0]
    assert isinstance(subject, TokenSubject)
    assert subject.delegation == Delegation(("y", "z"), 2, True)
    assert again.service.mcp_endpoints == ("/mcp", "/other-mcp")


def test_documents_without_mcp_or_delegation_keep_their_bytes() -> None:
    # New fields are absent unless set, so existing policies keep their version on upgrade.
    plain = ServiceConfig("ns", "svc", "api", 80)
    doc = make_document(plain, (), (GRANTS[3],), ())
    text = encode_document(doc).decode()
    assert "mcp" not in text
    assert "delegation" not in text


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["grants"][0]["rules"][0]["mcp"].update(tools=["a b"]), "tools[0]"),
        (lambda d: d["grants"][0]["rules"][0]["mcp"].update(tools=["a**"]), "tools[0]"),
        (lambda d: d["grants"][0]["rules"][0]["mcp"].update(endpoints=["/m/"]), "endpoints[0]"),
        (lambda d: d["grants"][0]["rules"][0]["mcp"].update(tools=[], resources=[]), "mcp"),
        (lambda d: d["service"].update(mcpEndpoints=["/x/../y"]), "mcpEndpoints[0]"),
        (lambda d: d["grants"][0]["rules"][0].update(methods=["GET"]), "methods"),
    ],
)
def test_decoding_rejects_invalid_mcp_parts(mutate, where) -> None:  # type: ignore[no-untyped-def]
    doc = make_document(SERVICE, (), (GRANTS[0],), ())
    obj = json.loads(encode_document(doc))
    mutate(obj)
    with pytest.raises(PolicyDocumentError, match=where.replace("[", r"\[").replace("]", r"\]")):
        decode_document(json.dumps(obj).encode())


def test_name_patterns() -> None:
    assert name_matches("get_*", "get_weather")
    assert name_matches("*", "anything/at:all")
    assert name_matches("a*c*e", "abcde")
    assert not name_matches("get_*", "GET_weather")
    assert not name_matches("*", "caf\u00e9")
    assert not name_matches("get_*", "get_w\u0435ather")
    assert not name_matches("a.b", "axb")  # "." is literal


def test_mcp_decisions() -> None:
    p = policy()
    agent = token("agent")
    assert decide_mcp(p, agent, "/mcp", McpKind.TOOL, "get_weather", NOW).grant == "ns/agent"
    assert decide_mcp(p, agent, "/mcp", McpKind.TOOL, "search", NOW).allowed
    assert not decide_mcp(p, agent, "/mcp", McpKind.TOOL, "searchx", NOW).allowed
    assert decide_mcp(p, agent, "/mcp", McpKind.RESOURCE, "file:///d/x", NOW).allowed
    assert not decide_mcp(p, agent, "/mcp", McpKind.PROMPT, "p1", NOW).allowed
    assert decide_mcp(p, agent, "/other-mcp", McpKind.PROMPT, "p1", NOW).allowed
    # A rule without endpoints covers every endpoint the service declares.
    assert decide_mcp(p, agent, "/other-mcp", McpKind.TOOL, "get_weather", NOW).grant == "ns/agent"
    assert not decide_mcp(p, agent, "/mcp", McpKind.PROMPT, "p1", NOW).allowed
    assert decide_mcp(p, agent, "/mcp", None, "", NOW).allowed  # session-level methods
    late = decide_mcp(p, token("late"), "/mcp", McpKind.TOOL, "x", NOW)
    assert (late.reason, late.grant) == (Reason.GRANT_EXPIRED, "ns/expired")
    assert decide_mcp(p, token("nobody"), "/mcp", None, "", NOW).reason is Reason.NO_MATCHING_GRANT


def test_path_rules_never_decide_mcp_and_mcp_rules_never_allow_http() -> None:
    p = policy((GRANTS[0],))
    assert not decide_mcp(policy((GRANTS[3],)), token("agent"), "/mcp", None, "", NOW).allowed
    facts = Facts(identity=token("agent"), method="POST", path="/mcp", now=NOW)
    assert decide(p, facts).reason is Reason.NO_MATCHING_GRANT


def test_endpoint_of_covers_subpaths_in_any_case() -> None:
    for path in ("/mcp", "/mcp/", "/MCP", "/Mcp/x/y"):
        assert mcp_endpoint_of(SERVICE, path) == "/mcp"
    for path in ("/mcpx", "/", "/other"):
        assert mcp_endpoint_of(SERVICE, path) is None


@pytest.mark.parametrize(
    ("delegation", "actors", "verdict"),
    [
        (None, (), None),
        (None, ("a",), Reason.DELEGATION_NOT_ALLOWED),
        (Delegation(("agent-*",)), (), None),
        (Delegation(("agent-*",), required=True), (), Reason.ACTOR_REQUIRED),
        (Delegation(("agent-*",)), ("agent-1",), None),
        (Delegation(("agent-*",)), ("agent-1", "agent-2"), Reason.DELEGATION_TOO_DEEP),
        (Delegation(("agent-*",), 2), ("agent-1", "agent-2"), None),
        (Delegation(("agent-*",), 2), ("agent-1", "rogue"), Reason.ACTOR_NOT_ALLOWED),
    ],
)
def test_chain_verdicts(
    delegation: Delegation | None, actors: tuple[str, ...], verdict: Reason | None
) -> None:
    assert chain_verdict(delegation, actors) is verdict


def test_http_decisions_report_the_chain_reason() -> None:
    grant = Grant(
        "ns/g",
        (TokenSubject("iss", "alice", (), Delegation(("agent-*",), 1, True)),),
        (Rule(frozenset({"GET"}), ("/v1/**",)),),
    )
    p = policy((grant,))

    def reason(actors: tuple[str, ...]) -> Reason:
        return decide(p, Facts(token("alice", actors), "GET", "/v1/x", NOW)).reason

    assert reason(("agent-1",)) is Reason.ALLOWED
    assert reason(()) is Reason.ACTOR_REQUIRED
    assert reason(("agent-1", "agent-2")) is Reason.DELEGATION_TOO_DEEP
    assert reason(("rogue",)) is Reason.ACTOR_NOT_ALLOWED


def test_explain_and_who_can_for_tools() -> None:
    p = policy()
    answer = explain_mcp(p, token("agent"), "/mcp", McpKind.TOOL, "delete_all", NOW)
    assert not answer.decision.allowed
    why = {v.grant: v.why_not for v in answer.verdicts}
    assert why["ns/agent"] == ("tool delete_all matches none of [get_*, search]",)
    assert why["ns/http"] == ("no MCP rule for endpoint /mcp",)
    ok = explain_mcp(p, token("agent", ("bot",)), "/mcp", McpKind.TOOL, "get_x", NOW)
    assert not ok.decision.allowed
    assert ok.decision.reason is Reason.DELEGATION_NOT_ALLOWED
    assert "accepts no delegation" in ok.verdicts[0].why_not[0]
    names = [(g.name, s) for g, s in who_can_mcp(p, "/mcp", McpKind.TOOL, "get_weather", NOW)]
    assert [n for n, _ in names] == ["ns/agent"]


GRANT_YAML = {
    "apiVersion": "nhigate.io/v1alpha1",
    "kind": "RouteGrant",
    "metadata": {"name": "agent", "namespace": "ns"},
    "spec": {
        "target": {"protectedService": "svc"},
        "subjects": [
            {
                "token": {
                    "issuer": "iss",
                    "subject": "alice",
                    "delegation": {"actors": ["agent-*"], "maxDepth": 2},
                }
            }
        ],
        "rules": [{"mcp": {"tools": ["get_*"], "endpoints": ["/mcp"]}}],
    },
}


def _grant(**rule: object) -> dict[str, object]:
    spec = dict(GRANT_YAML["spec"])  # type: ignore[arg-type]
    spec["rules"] = [rule]
    return {**GRANT_YAML, "spec": spec}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"mcp": {"tools": []}}, "an MCP rule needs at least one tool, resource or prompt"),
        ({"mcp": {"tools": ["a"]}, "methods": ["GET"]}, "either methods and paths, or mcp"),
        ({"methods": ["GET"]}, "either methods and paths, or mcp"),
        ({"mcp": {"tools": ["a**"]}}, "should match pattern"),
        ({"mcp": {"tools": ["caf\u00e9"]}}, "should match pattern"),
        ({"mcp": {"tools": ["a"], "endpoints": ["/mcp/"]}}, "should match pattern"),
    ],
)
def test_route_grant_model_rejects_bad_mcp_rules(rule: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RouteGrant.model_validate(_grant(**rule))


def test_compile_from_resources() -> None:
    ps = ProtectedService.model_validate(
        {
            "apiVersion": "nhigate.io/v1alpha1",
            "kind": "ProtectedService",
            "metadata": {"name": "svc", "namespace": "ns"},
            "spec": {"backend": {"service": "api", "port": 80}, "issuers": ["iss"],
                     "mcp": {"endpoints": ["/mcp"]}},
        }
    )  # fmt: skip
    grant = RouteGrant.model_validate(GRANT_YAML)
    doc = build_policy_document(ps, [], [grant], [], now=datetime.now(UTC))
    assert doc.service.mcp_endpoints == ("/mcp",)
    p = compile_policy(doc)
    assert decide_mcp(p, token("alice", ("agent-3",)), "/mcp", McpKind.TOOL, "get_x", NOW).allowed
    assert undeclared_mcp_endpoints(grant, ps) == []
    other = RouteGrant.model_validate(_grant(mcp={"tools": ["a"], "endpoints": ["/nope"]}))
    assert undeclared_mcp_endpoints(other, ps) == ["/nope"]
