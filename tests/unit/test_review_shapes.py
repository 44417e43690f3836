"""`PathShapes`: the narrowest patterns covering the paths seen under one grant pattern."""

from __future__ import annotations

import pytest

from nhigate.policy import PathPattern
from nhigate.review.shapes import MAX_FANOUT, MAX_NODES, PathShapes, is_identifier


def _shapes(pattern: str, *paths: str) -> list[str]:
    shapes = PathShapes(PathPattern.compile(pattern))
    for path in paths:
        shapes.add(path[1:].split("/"))
    return shapes.patterns()


def test_a_subtree_used_for_two_routes_narrows_to_them() -> None:
    assert _shapes("/v1/**", "/v1/payments", "/v1/refunds") == ["/v1/payments", "/v1/refunds"]


def test_identifiers_become_one_segment_wildcards() -> None:
    assert _shapes("/v1/**", "/v1/payments/42", "/v1/payments/7/history") == [
        "/v1/payments/*",
        "/v1/payments/*/history",
    ]


@pytest.mark.parametrize(
    ("segment", "expected"),
    [("42", True), ("123e4567-e89b-12d3-a456-426614174000", True), ("0f3a9c1e2b4d5f60", True)],
)
def test_what_counts_as_an_identifier(segment: str, expected: bool) -> None:
    assert is_identifier(segment) is expected


@pytest.mark.parametrize("segment", ["payments", "v1", "cafe", "deadbeef"])
def test_route_names_are_not_identifiers(segment: str) -> None:
    assert not is_identifier(segment)


def test_many_siblings_fold_into_a_wildcard() -> None:
    names = [f"/v1/{chr(ord('a') + i)}/x" for i in range(MAX_FANOUT + 1)]
    assert _shapes("/v1/**", *names) == ["/v1/*/x"]


def test_at_most_the_fanout_siblings_stay_literal() -> None:
    names = [f"/v1/{chr(ord('a') + i)}" for i in range(MAX_FANOUT)]
    assert _shapes("/v1/**", *names) == sorted(names)


def test_a_literal_of_the_original_pattern_is_never_generalised() -> None:
    # "42" looks like an id, but the grant names it: widening it would grant /7/x.
    assert _shapes("/42/*", "/42/x") == ["/42/x"]
    assert _shapes("/v1/42/**", "/v1/42/7") == ["/v1/42/*"]


def test_a_path_with_a_literal_star_is_only_matched_by_a_wildcard() -> None:
    # A request for /v1/a*b (literal "*") is matched by no pattern but `*`: a literal
    # segment "a*b" in a pattern would be refused, and "*" alone means any segment.
    assert _shapes("/v1/**", "/v1/a*b") == ["/v1/*"]
    assert _shapes("/v1/**", "/v1/**") == ["/v1/*"]


def test_a_trailing_slash_stays_exact() -> None:
    # `*` never matches the empty last segment of /v1/a/, so it must stay literal.
    names = [f"/v1/{chr(ord('a') + i)}/" for i in range(MAX_FANOUT + 1)]
    assert _shapes("/v1/**", *names) == ["/v1/*/"]
    assert PathPattern.compile("/v1/*/").matches("/v1/a/")


def test_the_prefix_of_a_subtree_is_its_own_exact_pattern() -> None:
    assert _shapes("/v1/items/**", "/v1/items") == ["/v1/items"]


def test_an_exact_pattern_is_kept() -> None:
    assert _shapes("/v1/refunds", "/v1/refunds") == ["/v1/refunds"]


def test_many_siblings_at_every_depth_stay_bounded_by_folding() -> None:
    shapes = PathShapes(PathPattern.compile("/v1/**"))
    for i in range(MAX_NODES * 2):
        word = "".join(chr(ord("a") + int(d)) for d in str(i))
        shapes.add(["v1", word, word + "x", word + "y"])
    assert shapes.patterns() == ["/v1/*/*/*"]


def test_too_many_shapes_keep_the_original_pattern() -> None:
    shapes = PathShapes(PathPattern.compile("/v1/**"))
    shapes.add(["v1", *(["deep"] * MAX_NODES)])
    assert shapes.saturated
    assert shapes.patterns() == ["/v1/**"]


@pytest.mark.parametrize(
    ("pattern", "paths"),
    [
        ("/**", ["/", "/a", "/a/b/", "/42/x/y"]),
        ("/v1/*/x/**", ["/v1/a/x", "/v1/b/x/1/2", "/v1/c/x/"]),
        ("/*", ["/a", "/b", "/a*b"]),
    ],
)
def test_every_pattern_produced_is_valid_narrower_and_covers_the_paths(
    pattern: str, paths: list[str]
) -> None:
    original = PathPattern.compile(pattern)
    produced = [PathPattern.compile(p) for p in _shapes(pattern, *paths)]
    assert all(any(p.matches(path) for p in produced) for path in paths)
    assert all(original.matches(p.pattern.replace("/**", "").replace("*", "z")) for p in produced)
