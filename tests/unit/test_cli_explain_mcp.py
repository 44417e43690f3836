"""`nhigate explain` / `who-can` with `--mcp-tool` and `--actor`, from YAML resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from nhigate.cli.main import main

RESOURCES = """
apiVersion: nhigate.io/v1alpha1
kind: IdentityIssuer
metadata: {name: agents, namespace: tools}
spec:
  issuer: https://agents.example
  audiences: [tools]
  jwks: {keys: [{kty: EC, crv: P-256, kid: k1,
    x: f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU,
    y: x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0}]}
---
apiVersion: nhigate.io/v1alpha1
kind: ProtectedService
metadata: {name: tools, namespace: tools}
spec:
  backend: {service: tools, port: 8080}
  issuers: [agents]
  mcp: {endpoints: [/mcp]}
---
apiVersion: nhigate.io/v1alpha1
kind: RouteGrant
metadata: {name: weather-agent, namespace: tools}
spec:
  target: {protectedService: tools}
  subjects:
  - token:
      issuer: agents
      subject: alice
      delegation: {actors: ["agent-*"], maxDepth: 1}
  rules:
  - mcp: {tools: [get_weather, "search_*"]}
"""
AT = "2026-05-01T00:00:00Z"


@pytest.fixture
def resources(tmp_path: Path) -> Path:
    path = tmp_path / "tools.yaml"
    path.write_text(RESOURCES)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_explain_a_tool_call_with_an_actor(
    capsys: pytest.CaptureFixture[str], resources: Path
) -> None:
    base = ("explain", "-r", str(resources), "--at", AT, "--as", "token:agents/alice")
    code, out = run(
        capsys, *base, "--actor", "agent-7", "--mcp-tool", "get_weather", "POST", "/mcp"
    )
    assert code == 0, out
    assert "ALLOWED: allowed" in out
    assert "actors:    agent-7 (current actor first)" in out
    assert "MCP:       endpoint /mcp: tool get_weather" in out

    code, out = run(capsys, *base, "--actor", "agent-7", "--mcp-tool", "delete_all", "POST", "/mcp")
    assert code == 1
    assert "tool delete_all matches none of [get_weather, search_*]" in out

    code, out = run(capsys, *base, "--actor", "rogue", "--mcp-tool", "get_weather", "POST", "/mcp")
    assert code == 1
    assert "DENIED: actor_not_allowed" in out
    assert "actor chain rogue has an actor matching none of [agent-*]" in out

    chain = ("--actor", "agent-7", "--actor", "agent-8")
    code, out = run(capsys, *base, *chain, "--mcp-tool", "get_weather", "POST", "/mcp")
    assert code == 1
    assert "DENIED: delegation_too_deep" in out


def test_mcp_flags_need_an_mcp_endpoint(
    capsys: pytest.CaptureFixture[str], resources: Path
) -> None:
    code = main(
        ["explain", "-r", str(resources), "--as", "token:agents/alice", "--mcp-tool", "x",
         "POST", "/other"]
    )  # fmt: skip
    assert code == 2


def test_who_can_use_a_tool(capsys: pytest.CaptureFixture[str], resources: Path) -> None:
    base = ("who-can", "-r", str(resources), "--at", AT)
    code, out = run(capsys, *base, "--mcp-tool", "search_docs", "POST", "/mcp")
    assert code == 0
    assert "May use tool search_docs on MCP endpoint /mcp:" in out
    assert "subject alice, acted for by [agent-*] (max depth 1)" in out
    code, out = run(capsys, *base, "--mcp-tool", "delete_all", "POST", "/mcp")
    assert code == 1
    # A path question about the MCP endpoint is answered with the MCP rules.
    code, out = run(capsys, *base, "POST", "/MCP/")
    assert code == 0
    assert "May use /mcp:" in out
