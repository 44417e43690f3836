"""Path normalisation and the path-pattern grammar (docs/path-grammar.md)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nhigate.policy import (
    Decision,
    Facts,
    Grant,
    Identity,
    IdentityKind,
    PathPattern,
    PathRejected,
    Policy,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    decide,
    make_document,
    normalise_path,
)
from nhigate.policy.paths import MAX_PATH_LENGTH

BOUNDED = settings(max_examples=300, deadline=None)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("//a///b//", "/a/b/"),
        ("/a/./b", "/a/b"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/a/b/../c", "/a/c"),
        ("/a/%2e/b", "/a/b"),
        ("/a/%2E%2e/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/.", "/"),
        ("/a/..", "/"),
        ("/%7Euser/%41%62%2D%5F", "/~user/Ab-_"),
        ("/a/%3f/%23", "/a/%3F/%23"),
        ("/a%3bb", "/a%3Bb"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a b", "/a%20b"),
        ("/{x}|^", "/%7Bx%7D%7C%5E"),
        ("/a;b=c/d:e@f!$&'()*+,", "/a;b=c/d:e@f!$&'()*+,"),
        ("/100%25", "/100%25"),
        ("/100%25x", "/100%25x"),
        ("/.well-known/jwks.json", "/.well-known/jwks.json"),
        ("/a/.../b", "/a/.../b"),
        ("/Admin", "/Admin"),
    ],
)
def test_normalises(raw: str, canonical: str) -> None:
    assert normalise_path(raw) == canonical
    assert normalise_path(canonical) == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "not_absolute"),
        ("a/b", "not_absolute"),
        ("*", "not_absolute"),
        ("/a%2fb", "encoded_slash"),
        ("/a%2Fb", "encoded_slash"),
        ("/a%5cb", "encoded_backslash"),
        ("/a%5C..%5Cb", "encoded_backslash"),
        ("/a\\b", "backslash"),
        ("/a\\..\\admin", "backslash"),
        ("/a%00", "control_character"),
        ("/a\x00b", "control_character"),
        ("/a\tb", "control_character"),
        ("/a\r\nb", "control_character"),
        ("/a%0d%0a", "control_character"),
        ("/a%7f", "control_character"),
        ("/a\x7f", "control_character"),
        ("/a%", "invalid_percent_encoding"),
        ("/a%4", "invalid_percent_encoding"),
        ("/a%zz", "invalid_percent_encoding"),
        ("/a%%41", "invalid_percent_encoding"),
        ("/caf\u00e9", "non_ascii"),
        ("/a\u2215b", "non_ascii"),
        ("/a%252e%252e/b", "double_encoding"),
        ("/a%252F", "double_encoding"),
        ("/a%25%32%65", "double_encoding"),
        ("/..", "above_root"),
        ("/a/../..", "above_root"),
        ("/%2e%2e/etc/passwd", "above_root"),
        ("/a/..;/admin", "dot_segment_parameter"),
        ("/a/.;x/admin", "dot_segment_parameter"),
        ("/a/..%3b/admin", "dot_segment_parameter"),
        ("/%C0%AE%C0%AE/admin", "invalid_utf8"),
        ("/a%ff", "invalid_utf8"),
        ("/a?b", "invalid_character"),
        ("/a#b", "invalid_character"),
        ("/[::1]", "invalid_character"),
        ("/" + "a" * MAX_PATH_LENGTH, "too_long"),
        ("/" + "%20" * 3000, "too_long"),
    ],
)
def test_rejects(raw: str, reason: str) -> None:
    with pytest.raises(PathRejected) as caught:
        normalise_path(raw)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def test_longest_accepted_path() -> None:
    raw = "/" + "a" * (MAX_PATH_LENGTH - 1)
    assert normalise_path(raw) == raw


# --- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/a/b", "/a/b", True),
        ("/a/b", "/a/b/", False),
        ("/a/b", "/a", False),
        ("/a/b", "/A/b", False),
        ("/a/b/", "/a/b/", True),
        ("/", "/", True),
        ("/", "/a", False),
        ("/a/*", "/a/x", True),
        ("/a/*", "/a/", False),
        ("/a/*", "/a", False),
        ("/a/*", "/a/x/y", False),
        ("/a/*", "/a/x/", False),
        ("/a/*/c", "/a/b/c", True),
        ("/a/*/c", "/a/b/d", False),
        ("/*", "/x", True),
        ("/*", "/", False),
        ("/a/**", "/a", True),
        ("/a/**", "/a/", True),
        ("/a/**", "/a/b", True),
        ("/a/**", "/a/b/c/", True),
        ("/a/**", "/ab", False),
        ("/a/**", "/", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/a/*/**", "/a", False),
        ("/a/*/**", "/a/b", True),
        ("/a/*/**", "/a/b/c", True),
        ("/a/%2A", "/a/%2A", True),
        ("/a/%2A", "/a/x", False),
    ],
)
def test_pattern_matching(pattern: str, path: str, expected: bool) -> None:
    assert PathPattern.compile(pattern).matches(path) is expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a/b", "must start with '/'"),
        ("", "must start with '/'"),
        ("/a//b", "must not contain '//'"),
        ("/a/../b", "dot-segments"),
        ("/a/./b", "dot-segments"),
        ("/a/%2e%2e/b", "dot-segments"),
        ("/a*/b", "whole segments"),
        ("/a/b*", "whole segments"),
        ("/a/***", "whole segments"),
        ("/**/a", "only allowed as the last segment"),
        ("/a/**/**", "only allowed as the last segment"),
        ("/a%2fb", "not a valid path"),
        ("/a\\b", "not a valid path"),
        ("/a%41", "not in canonical form; write '/aA'"),
        ("/a%3f", "not in canonical form; write '/a%3F'"),
    ],
)
def test_invalid_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PathPattern.compile(pattern)


# --- properties -----------------------------------------------------------------------------

_PIECES = st.sampled_from(
    ["a", "B", "admin", "ADMIN", "Public", "public", ".", "..", "...", "%2e", "%2E", "%2e%2e",
     ".%2e", "%2E.", "", "%2f", "%2F", "\\", "%5c", "%252e", "%25", "%00", ";", "..;", ".;x",
     "%3b", "%41", "%7e", "~", "*", "%C0%AE", "%c3%a9", " ", "?", "#", "%", "%2", "x%2"]
)  # fmt: skip


@st.composite
def attack_paths(draw: st.DrawFn, prefix: str = "") -> str:
    pieces = draw(st.lists(_PIECES, max_size=8))
    return prefix + "/" + "/".join(pieces)


_RAW_ALPHABET = st.sampled_from([*list("/./%2eEfF5cC0aA\\;x~ ?"), "%2e", "%2f", "%25", ".."])


@BOUNDED
@given(st.one_of(attack_paths(), st.lists(_RAW_ALPHABET, max_size=30).map("".join)))
def test_normalisation_is_idempotent_and_canonical(raw: str) -> None:
    try:
        canonical = normalise_path(raw)
    except PathRejected:
        return
    assert normalise_path(canonical) == canonical
    assert canonical.startswith("/")
    assert "//" not in canonical
    segments = canonical[1:].split("/")
    assert "." not in segments
    assert ".." not in segments
    assert "\\" not in canonical
    assert re.search(r"%(?![0-9A-F]{2})", canonical) is None, "escapes are upper-case hex"
    assert re.search(r"%25[0-9A-Fa-f]{2}", canonical) is None, "never double-encoded"


def _backend_view(canonical: str) -> str:
    """What a backend that percent-decodes once and then resolves dot-segments would see."""
    decoded = unquote(canonical, errors="strict")
    out: list[str] = []
    for segment in decoded.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    return "/" + "/".join(out)


def _policy_granting(pattern: str) -> Policy:
    svc = ServiceConfig("ns", "svc", "backend", 8080)
    grant = Grant(
        name="ns/public",
        subjects=(TokenSubject(issuer="idp", subject="alice"),),
        rules=(Rule(methods=frozenset({"GET"}), paths=(pattern,)),),
    )
    return compile_policy(make_document(svc, [], [grant], []))


_ALICE = Identity(kind=IdentityKind.JWT, issuer="idp", subject="alice")
_PUBLIC = _policy_granting("/public/**")


def _decide_raw(raw: str) -> Decision | None:
    try:
        canonical = normalise_path(raw)
    except PathRejected:
        return None
    return decide(_PUBLIC, Facts(identity=_ALICE, method="GET", path=canonical, now=0.0))


@BOUNDED
@given(attack_paths(prefix="/public"))
def test_attack_paths_never_reach_an_ungranted_route(raw: str) -> None:
    decision = _decide_raw(raw)
    if decision is None or not decision.allowed:
        return
    canonical = normalise_path(raw)
    assert canonical == "/public" or canonical.startswith("/public/")
    # The backend, decoding once, must land in the same subtree and see no dot-segment.
    seen = _backend_view(canonical)
    assert seen == "/public" or seen.startswith("/public/")
    assert "." not in canonical[1:].split("/")
    assert ".." not in unquote(canonical).split("/")


@pytest.mark.parametrize(
    "raw",
    [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public//../admin",
        "/public/x/../../admin",
        "/PUBLIC/x",
        "/Public/x",
        "/publicx",
        "/public%2f../admin",
        "/public/..%2fadmin",
        "/public\\..\\admin",
        "/public/%5c../admin",
        "/public/%252e%252e/admin",
        "/public/..;/admin",
        "/public/%C0%AE%C0%AE/admin",
    ],
)
def test_known_traversal_attacks_are_denied(raw: str) -> None:
    decision = _decide_raw(raw)
    assert decision is None or not decision.allowed


def test_granted_paths_are_allowed() -> None:
    for raw in [
        "/public",
        "/public/",
        "/public/a/b",
        "/public/./a",
        "/public/a/../b",
        "/public//a",
    ]:
        decision = _decide_raw(raw)
        assert decision is not None
        assert decision.allowed, raw


def test_raw_non_canonical_path_in_facts_is_rejected() -> None:
    facts = Facts(identity=_ALICE, method="GET", path="/public/../admin", now=0.0)
    assert not decide(_PUBLIC, facts).allowed
