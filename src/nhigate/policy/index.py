"""Compile a `PolicyDocument` into an immutable index for per-request decisions.

`decide()` must not scan every grant: grants are bucketed by subject key
(service account, issuer + subject, issuer-only claim matchers, SPIFFE ID),
and within a bucket by path in a segment trie whose nodes hold the entries
(rule methods, grant, required claims) of the patterns ending there. A lookup
costs O(identity buckets x path depth + entries on the matched nodes),
independent of how many grants other identities hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from nhigate.policy.allocation import gc_paused
from nhigate.policy.document import PolicyDocument
from nhigate.policy.model import (
    Decision,
    Delegation,
    Grant,
    Identity,
    IdentityKind,
    Reason,
    Revocation,
    ServiceAccountSubject,
    Subject,
    TokenSubject,
)
from nhigate.policy.names import any_name_matches
from nhigate.policy.paths import PathPattern
from nhigate.policy.retirement import LiveIndex, index_live_identities, retirement

Claims = tuple[tuple[str, str], ...]
_Entry = tuple[frozenset[str], "Grant", Claims, Delegation | None]
"""(a rule's methods, its grant, claims the identity must also carry, the actor chains the
subject accepts): one shared tuple per (grant, subject, rule), referenced from each of the
rule's patterns. The grant, not its position, so that a trie holds no positions and can
be shared by the next version of the policy when its grants did not change."""

_ANY_METHOD = "*"

MCP_METHOD: Final = "mcp:"
"""The pseudo-method MCP rules are indexed under, at each MCP endpoint path. It is not an
HTTP token (`:`), so no HTTP request can carry it; MCP endpoints are decided by
`nhigate.policy.mcp`, never by `decide()`."""
_MCP_METHODS: Final = frozenset({MCP_METHOD})


_NO_CHILDREN: dict[str, _Node] = {}
_NO_ENTRIES: list[_Entry] = []
"""Shared empty tables for nodes that have none (never mutated: `insert` replaces them)."""


class _Node:
    """A segment-trie node: literal children, a `*` child, and the entries ending here.

    Most nodes are leaves holding one or two entries, so the tables start as shared
    empty ones and are created on first insert, and a node's entries are one list
    (each entry names its methods) rather than a table of lists per method: a
    10k-grant index has ~60k nodes, and every object it allocates costs a reload
    time and the garbage collector a visit.
    """

    __slots__ = ("children", "exact", "star", "subtree")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = _NO_CHILDREN
        self.star: _Node | None = None
        self.exact: list[_Entry] = _NO_ENTRIES
        """Entries whose pattern ends exactly at this node."""
        self.subtree: list[_Entry] = _NO_ENTRIES
        """Entries whose pattern is this node's prefix followed by `/**`."""

    def insert(self, pattern: PathPattern, entry: _Entry) -> None:
        node = self
        for segment in pattern.segments:
            if segment == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(segment)
                if child is None:
                    if node.children is _NO_CHILDREN:
                        node.children = {}
                    child = node.children[segment] = _Node()
                node = child
        if pattern.subtree:
            if node.subtree is _NO_ENTRIES:
                node.subtree = [entry]
            elif node.subtree[-1] is not entry:
                node.subtree.append(entry)
        elif node.exact is _NO_ENTRIES:
            node.exact = [entry]
        elif node.exact[-1] is not entry:
            # An entry is inserted for all its patterns before the next one is made, so
            # a repeat (one rule listing a pattern twice) can only be the last: O(1).
            node.exact.append(entry)

    def collect(self, segments: list[str], depth: int, method: str, out: list[_Entry]) -> None:
        if self.subtree:
            _extend(self.subtree, method, out)
        if depth == len(segments):
            if self.exact:
                _extend(self.exact, method, out)
            return
        segment = segments[depth]
        child = self.children.get(segment)
        if child is not None:
            child.collect(segments, depth + 1, method, out)
        if self.star is not None and segment:
            self.star.collect(segments, depth + 1, method, out)


def _extend(entries: list[_Entry], method: str, out: list[_Entry]) -> None:
    for entry in entries:
        methods = entry[0]
        if method in methods or _ANY_METHOD in methods:
            out.append(entry)


def claim_matches(required: str, actual: object) -> bool:
    """Does one token claim satisfy a grant's required string value?

    Strings compare exactly; a list claim (e.g. `groups`) matches when it
    contains the value; booleans match "true"/"false"; integers match their
    decimal form. Anything else (objects, floats, null) never matches.
    """
    if isinstance(actual, str):
        return actual == required
    if isinstance(actual, bool):
        return required == ("true" if actual else "false")
    if isinstance(actual, int):
        return required == str(actual)
    if isinstance(actual, list | tuple):
        return any(isinstance(item, str) and item == required for item in actual)
    return False


def claims_match(required: Claims, claims: Mapping[str, object]) -> bool:
    """True when every required (name, value) pair is satisfied by `claims`."""
    for name, value in required:
        if name not in claims or not claim_matches(value, claims[name]):
            return False
    return True


def subject_matches(subject: Subject, identity: Identity) -> bool:
    """Does a grant subject describe this verified identity? (The slow, obvious definition.)"""
    if isinstance(subject, ServiceAccountSubject):
        sa = identity.service_account
        return (
            identity.kind is IdentityKind.SERVICE_ACCOUNT
            and sa is not None
            and sa.namespace == subject.namespace
            and sa.name == subject.name
        )
    if isinstance(subject, TokenSubject):
        return (
            identity.kind in (IdentityKind.JWT, IdentityKind.SERVICE_ACCOUNT)
            and identity.issuer == subject.issuer
            and (subject.subject is None or identity.subject == subject.subject)
            and claims_match(subject.claims, identity.claims)
        )
    return identity.kind is IdentityKind.SPIFFE and identity.spiffe_id == subject.spiffe_id


_CHAIN_RANK: Final = {
    Reason.DELEGATION_NOT_ALLOWED: 1,
    Reason.ACTOR_REQUIRED: 2,
    Reason.ACTOR_NOT_ALLOWED: 3,
    Reason.DELEGATION_TOO_DEEP: 4,
}
"""Among chain denials, a higher rank is more specific (reported first)."""


def chain_verdict(delegation: Delegation | None, actors: tuple[str, ...]) -> Reason | None:
    """Why a subject with `delegation` does not accept this actor chain (None: it does).

    No `delegation`: only tokens without an actor chain. Otherwise the chain may be
    at most `max_depth` long, every actor must match one of `delegation.actors`, and
    a `required` delegation refuses tokens without an actor.
    """
    if delegation is None:
        return Reason.DELEGATION_NOT_ALLOWED if actors else None
    if not actors:
        return Reason.ACTOR_REQUIRED if delegation.required else None
    if len(actors) > delegation.max_depth:
        return Reason.DELEGATION_TOO_DEEP
    for actor in actors:
        if not any_name_matches(delegation.actors, actor):
            return Reason.ACTOR_NOT_ALLOWED
    return None


def subject_delegation(subject: Subject) -> Delegation | None:
    """The subject's delegation constraint (SPIFFE subjects have none)."""
    if isinstance(subject, ServiceAccountSubject | TokenSubject):
        return subject.delegation
    return None


@dataclass(frozen=True, slots=True)
class _RevocationHit:
    until: float
    """Epoch seconds; `math.inf` for revocations without an end."""
    name: str


def _add_revocation(table: dict[Any, _RevocationHit], key: object, rev: Revocation) -> None:
    until = math.inf if rev.until is None else rev.until
    known = table.get(key)
    if known is None or until > known.until:
        table[key] = _RevocationHit(until, rev.name)


ALLOWED, EXPIRED, NOT_YET_VALID, TENANT_MISMATCH = range(4)
"""Outcome ranks for `Policy.decision`; among denials a higher rank is more specific."""
_OUTCOME_REASONS = (
    Reason.ALLOWED,
    Reason.GRANT_EXPIRED,
    Reason.GRANT_NOT_YET_VALID,
    Reason.TENANT_MISMATCH,
)


_BucketKey = tuple[str, ...]
"""("sa", namespace, name), ("sub", issuer, subject), ("iss", issuer) or ("spiffe", id)."""
_Member = tuple[Grant, Subject]
_Signature = tuple[int, ...]
"""id() of each member's grant, in order: while both policies (so their grants) are alive,
equal signatures mean the same grants, hence the same trie."""
_Tries = dict[_BucketKey, tuple[_Signature, _Node]]


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled, immutable policy: the document plus the indexes `decide()` uses.

    Build it with `compile_policy`; never mutate its fields.
    """

    document: PolicyDocument
    grants: tuple[Grant, ...]
    _patterns: list[tuple[tuple[tuple[PathPattern, ...], ...], ...]] = field(
        repr=False, compare=False
    )
    """Holds `patterns` once something (explain, who_can) has asked for it."""
    _decisions: list[Decision | None] = field(repr=False, compare=False)
    """Per grant and outcome rank, the shared `Decision` (built on first use, then reused)."""
    _by_service_account: Mapping[tuple[str, str], _Node] = field(repr=False)
    _by_subject: Mapping[str, Mapping[str, _Node]] = field(repr=False)
    """issuer -> token subject -> trie."""
    _by_issuer: Mapping[str, _Node] = field(repr=False)
    """issuer -> trie of claim-only subjects."""
    _by_spiffe: Mapping[str, _Node] = field(repr=False)
    _revoked_subjects: Mapping[tuple[str, str], _RevocationHit] = field(repr=False)
    _revoked_tokens: Mapping[str, _RevocationHit] = field(repr=False)
    _revoked_sa_uids: Mapping[str, _RevocationHit] = field(repr=False)
    _has_revocations: bool = field(repr=False)
    _requires_actor: bool = field(repr=False, default=False)
    """Some subject sets `delegation.required` (so a token without `act` can be refused)."""
    _live: LiveIndex | None = field(repr=False, default=None)
    """The document's live service accounts and pods, indexed (None: not checked)."""
    _tries: _Tries = field(repr=False, compare=False, default_factory=dict)
    """Every bucket's trie with the signature it was built for (`compile_policy(previous=)`)."""
    _positions: dict[int, int] = field(repr=False, compare=False, default_factory=dict)
    """id(grant) -> its position in `grants` (the tries' entries hold grants, which `grants`
    keeps alive, so an id stands for one grant for as long as this policy lives)."""

    @property
    def version(self) -> str:
        """The document's content-hash version, e.g. ``sha256:0123456789abcdef``."""
        return self.document.version

    @property
    def patterns(self) -> tuple[tuple[tuple[PathPattern, ...], ...], ...]:
        """Per grant, per rule, the compiled path patterns (same order as the document)."""
        if not self._patterns:  # built on first use: decide() walks the trie instead
            self._patterns.append(
                tuple(
                    tuple(tuple(map(PathPattern.compile, rule.paths)) for rule in grant.rules)
                    for grant in self.grants
                )
            )
        return self._patterns[0]

    def decision(self, pos: int, outcome: int) -> Decision:
        """The shared, immutable decision grant `pos` produces for an outcome rank
        (`ALLOWED`, `EXPIRED`, `NOT_YET_VALID`, `TENANT_MISMATCH`)."""
        slot = pos * 4 + outcome
        decision = self._decisions[slot]
        if decision is None:
            # Built lazily: compiling a 10k-grant policy should not allocate 40k decisions.
            grant = self.grants[pos]
            if outcome == ALLOWED:
                decision = Decision(True, Reason.ALLOWED, grant.name, grant.rate_limit)
            else:
                decision = Decision(False, _OUTCOME_REASONS[outcome], grant.name)
            self._decisions[slot] = decision
        return decision

    def _collect(
        self, identity: Identity, method: str, segments: list[str], found: list[_Entry]
    ) -> None:
        kind = identity.kind
        if kind is IdentityKind.SPIFFE:
            if identity.spiffe_id is not None:
                node = self._by_spiffe.get(identity.spiffe_id)
                if node is not None:
                    node.collect(segments, 0, method, found)
            return
        sa = identity.service_account
        if kind is IdentityKind.SERVICE_ACCOUNT and sa is not None:
            node = self._by_service_account.get((sa.namespace, sa.name))
            if node is not None:
                node.collect(segments, 0, method, found)
        subjects = self._by_subject.get(identity.issuer)
        if subjects is not None:
            node = subjects.get(identity.subject)
            if node is not None:
                node.collect(segments, 0, method, found)
        node = self._by_issuer.get(identity.issuer)
        if node is not None:
            node.collect(segments, 0, method, found)

    def candidates(self, identity: Identity, method: str, segments: list[str]) -> list[int]:
        """Positions of grants with a subject matching `identity` (claims and actor chain
        included) and a rule matching (`method`, path `segments`), ascending and without
        duplicates."""
        found: list[_Entry] = []
        self._collect(identity, method, segments, found)
        if not found:
            return []
        actors = identity.actors
        if len(found) == 1:
            _, grant, required, delegation = found[0]
            if required and not claims_match(required, identity.claims):
                return []
            if (delegation is not None or actors) and chain_verdict(delegation, actors):
                return []
            return [self._positions[id(grant)]]
        claims = identity.claims
        position = self._positions
        positions = {
            position[id(grant)]
            for _, grant, required, delegation in found
            if (not required or claims_match(required, claims))
            and ((delegation is None and not actors) or chain_verdict(delegation, actors) is None)
        }
        return sorted(positions)

    def chain_denial(self, identity: Identity, method: str, segments: list[str]) -> Reason | None:
        """When `candidates()` found nothing: the most specific delegation reason among the
        entries whose subject and claims match but whose actor chain does not, else None.
        (Only on the deny path: it repeats the lookup.)"""
        if not identity.actors and not self._requires_actor:
            return None  # no subject requires an actor: the chain cannot be the reason
        found: list[_Entry] = []
        self._collect(identity, method, segments, found)
        best: Reason | None = None
        for _, _, required, delegation in found:
            if required and not claims_match(required, identity.claims):
                continue
            verdict = chain_verdict(delegation, identity.actors)
            if verdict is not None and (best is None or _CHAIN_RANK[verdict] > _CHAIN_RANK[best]):
                best = verdict
        return best

    def subject_grants(self, identity: Identity) -> list[int]:
        """Positions of every grant with a subject matching `identity` (linear; for explain)."""
        return [
            pos
            for pos, grant in enumerate(self.grants)
            if any(subject_matches(subject, identity) for subject in grant.subjects)
        ]

    def retirement(self, identity: Identity) -> str | None:
        """Why the credential's service account or pod no longer exists, or None."""
        if self._live is None:
            return None
        return retirement(self._live, identity)

    def revocation(self, identity: Identity, now: float) -> str | None:
        """Name of a revocation in force at `now` for this credential, or None."""
        if not self._has_revocations:
            return None
        hits = (
            self._revoked_subjects.get((identity.issuer, identity.subject)),
            self._revoked_tokens.get(identity.token_id) if identity.token_id else None,
            self._revoked_sa_uids.get(identity.service_account.uid)
            if identity.service_account is not None and identity.service_account.uid
            else None,
        )
        for hit in hits:
            if hit is not None and now < hit.until:
                return hit.name
        return None


def compile_policy(doc: PolicyDocument, previous: Policy | None = None) -> Policy:
    """Index a (validated) policy document for `decide()`.

    With `previous` (the policy this one replaces), the trie of every subject bucket whose
    grants are the same objects, in the same order, as in `previous` is shared rather than
    rebuilt (tries are never mutated once built, and hold grants, not their positions);
    `decode_document(reuse=)` is what makes unchanged grants the same objects.

    Raises ValueError when a grant carries an invalid path pattern; documents from
    `decode_document`/`make_document` are already validated.
    """
    with gc_paused():
        return _compile(doc, previous)


def _bucket_key(subject: Subject) -> _BucketKey:
    if isinstance(subject, ServiceAccountSubject):
        return ("sa", subject.namespace, subject.name)
    if isinstance(subject, TokenSubject):
        if subject.subject is None:
            return ("iss", subject.issuer)
        return ("sub", subject.issuer, subject.subject)
    return ("spiffe", subject.spiffe_id)


def _build_trie(members: list[_Member], mcp_endpoints: tuple[str, ...]) -> _Node:
    node = _Node()
    compile_pattern = PathPattern.compile  # cached by pattern text
    for grant, subject in members:
        delegation = subject_delegation(subject)
        claims: Claims = subject.claims if isinstance(subject, TokenSubject) else ()
        for rule in grant.rules:
            if rule.mcp is not None:
                # Indexed at each endpoint it covers, under a method no HTTP request has.
                mcp_entry = (_MCP_METHODS, grant, claims, delegation)
                for endpoint in rule.mcp.endpoints or mcp_endpoints:
                    if endpoint in mcp_endpoints:
                        node.insert(compile_pattern(endpoint), mcp_entry)
                continue
            entry = (rule.methods, grant, claims, delegation)
            for path in rule.paths:
                node.insert(compile_pattern(path), entry)
    return node


def _compile(doc: PolicyDocument, previous: Policy | None) -> Policy:
    mcp_endpoints = doc.service.mcp_endpoints
    known: _Tries = {}
    if previous is not None and previous.document.service.mcp_endpoints == mcp_endpoints:
        known = previous._tries
    buckets: dict[_BucketKey, list[_Member]] = {}
    positions: dict[int, int] = {}
    requires_actor = False
    for pos, grant in enumerate(doc.grants):
        positions.setdefault(id(grant), pos)
        for subject in grant.subjects:
            delegation = subject_delegation(subject)
            requires_actor = requires_actor or (delegation is not None and delegation.required)
            key = _bucket_key(subject)
            members = buckets.get(key)
            if members is None:
                buckets[key] = [(grant, subject)]
            else:
                members.append((grant, subject))
    tries: _Tries = {}
    by_sa: dict[tuple[str, str], _Node] = {}
    by_subject: dict[str, dict[str, _Node]] = {}
    by_issuer: dict[str, _Node] = {}
    by_spiffe: dict[str, _Node] = {}
    for key, members in buckets.items():
        signature = tuple([id(grant) for grant, _ in members])
        hit = known.get(key)
        if hit is not None and hit[0] == signature:
            node = hit[1]
        else:
            node = _build_trie(members, mcp_endpoints)
        tries[key] = (signature, node)
        if key[0] == "sa":
            by_sa[(key[1], key[2])] = node
        elif key[0] == "sub":
            by_subject.setdefault(key[1], {})[key[2]] = node
        elif key[0] == "iss":
            by_issuer[key[1]] = node
        else:
            by_spiffe[key[1]] = node
    by_pair: dict[tuple[str, str], _RevocationHit] = {}
    by_token: dict[str, _RevocationHit] = {}
    by_uid: dict[str, _RevocationHit] = {}
    for rev in doc.revocations:
        if rev.issuer is not None and rev.subject is not None:
            _add_revocation(by_pair, (rev.issuer, rev.subject), rev)
        if rev.token_id is not None:
            _add_revocation(by_token, rev.token_id, rev)
        if rev.service_account_uid is not None:
            _add_revocation(by_uid, rev.service_account_uid, rev)
    return Policy(
        document=doc,
        grants=doc.grants,
        _patterns=[],
        _decisions=[None] * (4 * len(doc.grants)),
        _by_service_account=by_sa,
        _by_subject=by_subject,
        _by_issuer=by_issuer,
        _by_spiffe=by_spiffe,
        _revoked_subjects=by_pair,
        _revoked_tokens=by_token,
        _revoked_sa_uids=by_uid,
        _has_revocations=bool(doc.revocations),
        _requires_actor=requires_actor,
        _live=None if doc.identities is None else index_live_identities(doc.identities),
        _tries=tries,
        _positions=positions,
    )


__all__ = [
    "ALLOWED",
    "EXPIRED",
    "MCP_METHOD",
    "NOT_YET_VALID",
    "TENANT_MISMATCH",
    "Policy",
    "chain_verdict",
    "claim_matches",
    "claims_match",
    "compile_policy",
    "subject_delegation",
    "subject_matches",
]
