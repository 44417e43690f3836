"""The path shapes seen under one grant path pattern, and the narrowest patterns covering them.

A `PathShapes` is a trie of the observed canonical paths' segments, generalised as it
grows so its size is bounded:

- a segment that looks like an identifier (all digits, a UUID, long hex) or contains
  `*` (which a pattern can only match with a wildcard) is stored as `*`;
- a node with more than `MAX_FANOUT` distinct literal children folds them into one `*`;
- a trie with more than `MAX_NODES` nodes gives up (`saturated`) and frees its nodes:
  the narrowest pattern it can then vouch for is the original one.

Generalising happens only where the original pattern has a `*` or below its `/**`
prefix, so every pattern produced matches a subset of what the original matches, and
every observed path matches one of them (tests/unit/test_review_invariant.py).
"""

from __future__ import annotations

import re

from nhigate.policy import PathPattern

MAX_NODES = 256
"""Nodes per trie; beyond this the trie is dropped and the original pattern kept."""
MAX_FANOUT = 8
"""Distinct literal children of a node before they are folded into `*`."""

WILDCARD = "*"
_IDENTIFIER = re.compile(
    r"[0-9]+|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    r"|[0-9A-Fa-f]{16,}"
)


def shape_of(path: str) -> str:
    """`path` with each identifier segment written `*`: /v1/payments/42 -> /v1/payments/*."""
    return "/".join(WILDCARD if is_identifier(s) else s for s in path.split("/"))


class _Node:
    __slots__ = ("children", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.terminal = False


def _merge(into: _Node, other: _Node) -> None:
    into.terminal = into.terminal or other.terminal
    for key, child in other.children.items():
        mine = into.children.get(key)
        if mine is None:
            into.children[key] = child
        else:
            _merge(mine, child)


def _count(node: _Node) -> int:
    return 1 + sum(_count(c) for c in node.children.values())


_IDENTIFIER_START = frozenset("0123456789abcdefABCDEF")


def is_identifier(segment: str) -> bool:
    """True for segments that name one object (ids, UUIDs, hashes) rather than a route."""
    if not segment or segment[0] not in _IDENTIFIER_START:
        return False  # the common route name ("v1", "orders"), without the regex
    return _IDENTIFIER.fullmatch(segment) is not None


class PathShapes:
    """The observed paths under one original pattern, bounded (see the module docstring)."""

    __slots__ = ("_fixed", "_nodes", "_root", "pattern", "saturated")

    def __init__(self, pattern: PathPattern) -> None:
        self.pattern = pattern
        self._root: _Node | None = _Node()
        self._nodes = 1
        self.saturated = False
        # Depths whose segment is a literal of the original pattern: never generalised.
        self._fixed = frozenset(i for i, s in enumerate(pattern.segments) if s != WILDCARD)

    def narrowable(self) -> bool:
        """False for exact patterns: there is nothing narrower that still matches the path."""
        return self.pattern.subtree or WILDCARD in self.pattern.segments

    def add(self, segments: list[str]) -> None:
        """Record one canonical path (split with `path_segments`) that matched `pattern`."""
        node = self._root
        if node is None:
            return
        fixed = self._fixed
        for depth, segment in enumerate(segments):
            if depth not in fixed and segment and (WILDCARD in segment or is_identifier(segment)):
                segment = WILDCARD
            child = node.children.get(segment)
            if child is None:
                if WILDCARD in node.children and segment and depth not in fixed:
                    child = node.children[WILDCARD]
                else:
                    child = _Node()
                    node.children[segment] = child
                    self._nodes += 1
                    if depth not in fixed and self._literal_fanout(node) > MAX_FANOUT:
                        child = self._fold(node)
                    if self._nodes > MAX_NODES:
                        self._saturate()
                        return
            node = child
        node.terminal = True

    @staticmethod
    def _literal_fanout(node: _Node) -> int:
        return sum(1 for key in node.children if key and key != WILDCARD)

    def _fold(self, node: _Node) -> _Node:
        """Fold `node`'s non-empty literal children into one `*` child; return it."""
        folded = node.children.pop(WILDCARD, None) or _Node()
        for key in [k for k in node.children if k]:
            _merge(folded, node.children.pop(key))
        node.children[WILDCARD] = folded
        assert self._root is not None
        self._nodes = _count(self._root)
        return folded

    def _saturate(self) -> None:
        self._root = None
        self.saturated = True

    def patterns(self) -> list[str]:
        """The narrowest patterns covering every recorded path (sorted), or the original one."""
        if self._root is None or not self.narrowable():
            return [self.pattern.pattern]
        found: list[str] = []
        self._walk(self._root, [], found)
        return sorted(found) if found else [self.pattern.pattern]

    def _walk(self, node: _Node, prefix: list[str], found: list[str]) -> None:
        if node.terminal:
            found.append("/" + "/".join(prefix))
        for key, child in node.children.items():
            prefix.append(key)
            self._walk(child, prefix, found)
            prefix.pop()
