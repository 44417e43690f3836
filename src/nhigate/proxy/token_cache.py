"""The verified-token cache: tokens whose signature and claims were checked, served again cheaply.

Keyed by the raw token string itself: a lookup hashes it with Python's keyed string
hash (SipHash, randomised per process) instead of a SHA-256, and a hit compares it in
full. An LRU bounded by entry count and by total token characters, so a flood of
distinct valid tokens costs bounded memory. A hit re-checks the token's time window and
that its issuer's keys are still the ones it was verified with; revocations and grants
are never cached (`decide()` checks them per request), so a cached token stays revocable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from nhigate.policy.model import Identity
from nhigate.proxy.tokens import ValidatedToken

CACHE_TOKEN_BYTES = 16 * 1024 * 1024
"""The cached tokens' total length is kept under this by default (their count is bounded too)."""


class KeySource(Protocol):
    """Where a cached token's keys came from: its `generation` changes when they stop counting
    (new keys, or the issuer retired), which invalidates every token verified before."""

    @property
    def generation(self) -> int: ...


# (identity, not_before, expires_at, key source, its generation at verification)
_Entry = tuple[Identity, float, float, KeySource, int]


class TokenCache:
    """Bounded LRU of verified tokens. Not thread-safe: one per event loop."""

    __slots__ = ("_bytes", "_clock", "_entries", "_max_bytes", "_max_entries", "hits")

    def __init__(
        self,
        max_entries: int,
        max_bytes: int = CACHE_TOKEN_BYTES,
        *,
        clock: Callable[[], float],
    ) -> None:
        """At most `max_entries` tokens (0: cache nothing) of at most `max_bytes` characters in
        all; `clock` gives epoch seconds, against which each hit's time window is checked."""
        self._max_entries = max(0, max_entries)
        self._max_bytes = max(0, max_bytes)
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        """Least recently used first."""
        self._bytes = 0
        self.hits = 0
        """Lookups answered from the cache (exported as a counter)."""

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Identity | None:
        """The identity of a cached `token` still inside its time window with unchanged keys.

        None when absent; an expired or stale entry is dropped, so the caller verifies afresh
        and refuses with the exact reason.
        """
        entry = self._entries.get(token)
        if entry is None:
            return None
        identity, not_before, expires_at, source, generation = entry
        if source.generation == generation and not_before <= self._clock() < expires_at:
            self._entries.move_to_end(token)
            self.hits += 1
            return identity
        self._drop(token)
        return None

    def store(self, token: str, verified: ValidatedToken, source: KeySource) -> None:
        """Remember `token`, verified just now with `source`'s current keys (call it in the same
        synchronous step as the verification), evicting the least recently used over a bound."""
        size = len(token)
        if not self._max_entries or size > self._max_bytes:
            return
        entries = self._entries
        if token in entries:  # verified twice concurrently: keep the newer entry
            self._drop(token)
        while entries and (
            len(entries) >= self._max_entries or self._bytes + size > self._max_bytes
        ):
            evicted, _ = entries.popitem(last=False)
            self._bytes -= len(evicted)
        entries[token] = (
            verified.identity,
            verified.not_before,
            verified.expires_at,
            source,
            source.generation,
        )
        self._bytes += size

    def evict_stale(self) -> None:
        """Drop every entry whose keys changed since it was verified (rotation, retirement)."""
        stale = [
            token
            for token, (_, _, _, source, generation) in self._entries.items()
            if source.generation != generation
        ]
        for token in stale:
            self._drop(token)

    def _drop(self, token: str) -> None:
        del self._entries[token]
        self._bytes -= len(token)
