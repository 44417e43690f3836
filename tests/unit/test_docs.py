"""The docs keep up with the code: every reason, metric and link is documented and resolves.

Each test reads the vocabulary from the code itself (condition constants, the `Reason` enum,
the proxy's metrics registry, `STATUS_FOR`), so adding something to the code without
documenting it fails here.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from nhigate.api import conditions
from nhigate.policy import Reason
from nhigate.proxy.metrics import ProxyMetrics
from nhigate.proxy.pipeline import STATUS_FOR

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

CONDITION_TYPES = {
    value
    for name, value in vars(conditions).items()
    if isinstance(value, str)
    and name.isupper()
    and not name.startswith(("REASON_", "_"))
    and name not in {"TRUE", "FALSE", "UNKNOWN"}
}
CONDITION_REASONS = {
    value
    for name, value in vars(conditions).items()
    if name.startswith("REASON_") and isinstance(value, str)
}

# `### \`Type\` = Status, \`Reason\``: the troubleshooting headings.
CONDITION_HEADING = re.compile(
    r"^#{2,4} `(?P<type>[A-Za-z]+)` = (?P<status>True|False|Unknown), `(?P<reason>[A-Za-z]+)`\s*$"
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _without_code_blocks(text: str) -> str:
    """Markdown outside fenced code blocks (links and headings inside code are not links)."""
    kept: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        kept.append("" if fenced else line)
    return "\n".join(kept)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    links = LINK.findall(_without_code_blocks(path.read_text(encoding="utf-8")))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def _exposed_metric_names() -> set[str]:
    """Every metric family the proxy's registry exposes (`*_created` samples aside)."""
    metrics = ProxyMetrics()
    metrics.watch_jwks_refreshes(lambda: {("demo-issuer", "success"): 1})
    metrics.set_policy_version("sha256:0000000000000000")
    metrics.policy_reloads.labels("loaded").inc()
    metrics.observe_request("allow", Reason.ALLOWED.value, "ns/grant", 0.001)
    metrics.upstream_duration.observe(0.001)
    text = generate_latest(metrics.registry).decode()
    names = set(re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE))
    return {n for n in names if not n.endswith("_created")}


# --- troubleshooting.md -------------------------------------------------------------------


def test_the_condition_vocabulary_is_what_this_test_expects() -> None:
    """Guards the introspection above: if it found nothing, every other check would pass."""
    assert {"Ready", "Accepted", "Enforced", "PolicyEnforced", "DirectPathBlocked"} <= (
        CONDITION_TYPES
    )
    assert {"InvalidSpec", "ReplicasBehind", "BypassFound", "FetchFailed"} <= CONDITION_REASONS


def test_every_condition_reason_has_a_troubleshooting_entry() -> None:
    headings = [
        m for line in TROUBLESHOOTING.read_text(encoding="utf-8").splitlines()
        if (m := CONDITION_HEADING.match(line))
    ]  # fmt: skip
    documented = {m.group("reason") for m in headings}
    missing = sorted(CONDITION_REASONS - documented)
    assert not missing, f"condition reasons with no troubleshooting heading: {missing}"


def test_every_troubleshooting_entry_names_a_real_type_and_reason() -> None:
    """Stale entries fail too: a heading must name constants that still exist."""
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    headings = [m for line in text.splitlines() if (m := CONDITION_HEADING.match(line))]
    assert headings, "no condition headings found in troubleshooting.md"
    for match in headings:
        assert match.group("type") in CONDITION_TYPES, match.group(0)
        assert match.group("reason") in CONDITION_REASONS, match.group(0)
    documented_types = {m.group("type") for m in headings}
    assert not CONDITION_TYPES - documented_types, sorted(CONDITION_TYPES - documented_types)


def test_every_audit_denial_reason_has_a_troubleshooting_row() -> None:
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    missing = [r.value for r in Reason if r is not Reason.ALLOWED and f"`{r.value}`" not in text]
    assert not missing, f"denial reasons not in troubleshooting.md: {missing}"


# --- operations.md ------------------------------------------------------------------------


def test_every_proxy_metric_is_documented_in_operations() -> None:
    names = _exposed_metric_names()
    assert "nhigate_proxy_requests_total" in names  # the introspection works
    text = OPERATIONS.read_text(encoding="utf-8")
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"metrics not documented in docs/operations.md: {missing}"


def test_operations_documents_no_metric_the_proxy_does_not_expose() -> None:
    names = _exposed_metric_names()
    text = OPERATIONS.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"`(nhigate_proxy_[a-z_]+)(?:\{[^`]*\})?`", text))
    stale = sorted(mentioned - names)
    assert not stale, f"docs/operations.md names metrics the proxy does not expose: {stale}"


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
def test_every_reason_is_in_the_operations_table_with_its_status(reason: Reason) -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    row = re.search(rf"^\| `{re.escape(reason.value)}` \| ([^|]+) \|", text, re.MULTILINE)
    assert row is not None, f"no row for `{reason.value}` in the reasons table of operations.md"
    if reason is Reason.ALLOWED:
        assert "upstream" in row.group(1)
    else:
        assert reason in STATUS_FOR, f"{reason.value} has no HTTP status in STATUS_FOR"
        assert row.group(1).strip() == str(STATUS_FOR[reason]), (
            f"operations.md says {row.group(1).strip()} for {reason.value}, "
            f"the proxy answers {STATUS_FOR[reason]}"
        )


# --- links ----------------------------------------------------------------------------------


def test_the_link_checker_sees_links() -> None:
    links = _relative_links(ROOT / "README.md")
    assert "docs/architecture.md" in links


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    broken: list[str] = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}: {broken}"


def test_slugs_follow_github() -> None:
    assert _slug("`ProxyAvailable` = False, `Unavailable`") == "proxyavailable--false-unavailable"
    assert _slug("Upgrades and the CRDs") == "upgrades-and-the-crds"
    assert _slug("3. Tokens: `iss`, `aud`") == "3-tokens-iss-aud"


# --- citations ------------------------------------------------------------------------------

SECURITY = DOCS / "security.md"
_CITED_INVARIANT = re.compile(r"security\.md(?: invariant |#)(\d+)(-[a-z0-9-]+)?")


def _cited_files() -> list[Path]:
    roots = [ROOT / "src", ROOT / "tests", ROOT / "bench", ROOT / "hack", DOCS]
    return [p for r in roots for p in r.rglob("*") if p.suffix in {".py", ".md", ".sh"}] + [
        ROOT / "README.md"
    ]


def test_nothing_cites_a_design_document_the_repository_does_not_hold() -> None:
    here = Path(__file__).resolve()
    citing = [
        str(p.relative_to(ROOT))
        for p in _cited_files()
        if p != here and any(name in p.read_text() for name in ("DESIGN" + ".md", "API" + "_SPEC"))
    ]
    assert citing == [], "cite docs/ instead (security invariants: docs/security.md)"


def test_every_cited_security_invariant_is_a_numbered_heading() -> None:
    numbered = {a.split("-", 1)[0]: a for a in _anchors(SECURITY) if re.match(r"\d+-", a)}
    assert sorted(numbered, key=int) == [str(n) for n in range(1, 9)]
    wrong: list[str] = []
    for path in _cited_files():
        for number, rest in _CITED_INVARIANT.findall(path.read_text()):
            if number not in numbered or (rest and numbered[number] != number + rest):
                wrong.append(f"{path.relative_to(ROOT)}: invariant {number}{rest}")
    assert not wrong, f"citations of missing invariants: {wrong}"
