"""Reloading a new policy version reuses what did not change, and refuses what a full decode
refuses: grants by their verified canonical text (`GrantReuse`), subject tries by the grants
they index (`compile_policy(previous=)`)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy_encoding import GRANTS, ISSUERS, REVOCATIONS, SERVICE, _hyp_grant

from nhigate.policy import (
    Grant,
    GrantReuse,
    Identity,
    IdentityKind,
    PolicyDocument,
    PolicyDocumentError,
    Rule,
    ServiceAccountRef,
    ServiceAccountSubject,
    SpiffeSubject,
    TokenSubject,
    compile_policy,
    decode_document,
    encode_document,
    encoding,
    make_document,
    pack_document,
)
from nhigate.policy.index import Policy
from nhigate.proxy.policy_source import _compile_packed

NOW = 1_800_000_000.0


def _grants(n: int) -> list[Grant]:
    return [
        Grant(
            f"ns/g{i:03d}",
            (TokenSubject("idp", f"client-{i % 7}"),),
            (
                Rule(frozenset({"GET"}), (f"/r{i}", f"/r{i}/*")),
                Rule(frozenset({"*"}), ("/all/**",)),
            ),
            expires_at=NOW + 3600,
            reason=f"r{i}",
        )
        for i in range(n)
    ]


def _encoded(grants: list[Grant]) -> bytes:
    return encode_document(make_document(SERVICE, ISSUERS, grants, REVOCATIONS))


def _primed(data: bytes) -> GrantReuse:
    reuse = GrantReuse()
    decode_document(data, reuse=reuse)
    return reuse


def _outcome(data: bytes, reuse: GrantReuse | None) -> PolicyDocument | str:
    try:
        return decode_document(data, reuse=reuse)
    except PolicyDocumentError as exc:
        return f"refused: {exc}"


# --- decode ---------------------------------------------------------------------------------


def test_unchanged_grants_are_reused_and_changed_ones_decoded() -> None:
    grants = _grants(20)
    before = _encoded(grants)
    reuse = GrantReuse()
    first = decode_document(before, reuse=reuse)
    assert len(reuse.grants) == 20
    grants[7] = dataclasses.replace(grants[7], reason="changed")
    del grants[3]
    grants.append(dataclasses.replace(grants[0], name="ns/g500"))
    after = _encoded(grants)
    second = decode_document(after, reuse=reuse)
    assert second == decode_document(after)  # the same document a full decode builds
    old = {g.name: g for g in first.grants}
    for grant in second.grants:
        if grant.name in ("ns/g007", "ns/g500"):
            assert grant is not old.get(grant.name)
        else:
            assert grant is old[grant.name]  # reused, not rebuilt
    assert set(reuse.grants.values()) == set(second.grants)  # remembers the new version


def test_a_non_canonical_document_is_decoded_in_full_and_not_remembered() -> None:
    data = _encoded(GRANTS)
    pretty = json.dumps(json.loads(data), indent=1).encode()
    reuse = _primed(data)
    assert decode_document(pretty, reuse=reuse) == decode_document(data)
    assert reuse.grants == {}  # nothing unverified is ever remembered


def test_a_refused_version_leaves_what_was_remembered() -> None:
    data = _encoded(_grants(5))
    reuse = _primed(data)
    remembered = dict(reuse.grants)
    with pytest.raises(PolicyDocumentError):
        decode_document(data.replace(b'"GET"', b'"get"', 1), reuse=reuse)
    assert reuse.grants == remembered


def test_a_wrong_version_is_refused_even_when_every_grant_is_reused() -> None:
    data = _encoded(_grants(5))
    version = json.loads(data)["version"]
    other = "sha256:" + ("0" if version[-1] != "0" else "1") * 16
    with pytest.raises(PolicyDocumentError, match="does not match the content"):
        decode_document(data.replace(version.encode(), other.encode()), reuse=_primed(data))


def test_a_duplicate_key_next_to_a_reused_grant_is_refused() -> None:
    data = _encoded(_grants(5))
    reuse = _primed(data)
    # The grant text itself is one `reuse` knows, preceded by a duplicated member.
    sneaky = data.replace(b'{"expiresAt":', b'{"expiresAt":null,"expiresAt":', 1)
    with pytest.raises(PolicyDocumentError, match="duplicate key"):
        decode_document(sneaky, reuse=reuse)
    assert decode_document(data, reuse=reuse).grants[0].expires_at == NOW + 3600


def test_a_grant_boundary_inside_a_string_does_not_split_a_grant() -> None:
    tricky = dataclasses.replace(_grants(1)[0], reason='},{"expiresAt":null}],"issuers":[')
    data = _encoded([tricky, *_grants(3)[1:]])
    reuse = _primed(data)
    assert decode_document(data, reuse=reuse) == decode_document(data)
    assert reuse.grants  # escaped quotes: the boundary text never occurs inside a string


_JSONISH = st.text(alphabet='{}[],:"\\iexpirsAtn \u00e9', max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_JSONISH, _JSONISH, _JSONISH), min_size=1, max_size=5))
def test_remembered_texts_are_exactly_the_encodings_of_their_grants(
    strings: list[tuple[str, str, str]],
) -> None:
    base = _grants(len(strings))
    grants = [
        dataclasses.replace(
            g,
            reason=reason,
            tenant=tenant or None,
            subjects=(TokenSubject("idp", None, (("c" + claim, claim),)),),
        )
        for g, (reason, tenant, claim) in zip(base, strings, strict=True)
    ]
    reuse = _primed(_encoded(grants))
    assert len(reuse.grants) == len(grants)
    for text, grant in reuse.grants.items():
        assert encoding._canonical_bytes(encoding._grant_json(grant)) == text.encode()


_MUTATIONS = st.sampled_from(["flip", "insert", "delete", "space", "duplicate"])


@settings(max_examples=300, deadline=None)
@given(
    grants=st.lists(_hyp_grant, min_size=1, max_size=5, unique_by=lambda g: g.name),
    data=st.data(),
)
def test_reuse_refuses_exactly_what_a_full_decode_refuses(grants: list[Grant], data: Any) -> None:
    """Differential: decoding with a primed `GrantReuse` has the same outcome as without."""
    original = _encoded(grants)
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        kind = data.draw(_MUTATIONS)
        if kind == "flip":
            mutated[at] = data.draw(st.sampled_from(b'{}[],:"\\ 0a-/*.ZT'))
        elif kind == "insert":
            mutated[at:at] = data.draw(st.sampled_from([b",", b'"x":1,', b"{", b"]", b"null,"]))
        elif kind == "delete":
            del mutated[at : at + data.draw(st.integers(1, 20))]
        elif kind == "space":
            mutated[at:at] = b" "
        else:  # repeat one member of the grant being mutated
            start = bytes(mutated).rfind(b'{"expiresAt":', 0, at + 1)
            if start >= 0:
                member = bytes(mutated[start + 1 : bytes(mutated).find(b",", start)])
                mutated[start + 1 : start + 1] = member + b","
    reuse = _primed(original)
    assert _outcome(bytes(mutated), reuse) == _outcome(bytes(mutated), None)


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(_hyp_grant, min_size=1, max_size=6, unique_by=lambda g: g.name),
    after=st.lists(_hyp_grant, max_size=3, unique_by=lambda g: g.name),
    keep=st.integers(0, 6),
)
def test_reuse_across_versions_builds_what_a_full_decode_builds(
    before: list[Grant], after: list[Grant], keep: int
) -> None:
    names = {g.name for g in after}
    new = after + [g for g in before[:keep] if g.name not in names]
    data = _encoded(new)
    assert _outcome(data, _primed(_encoded(before))) == decode_document(data)


# --- compile --------------------------------------------------------------------------------


def _probe(policy: Policy, grants: list[Grant]) -> list[list[int]]:
    """candidates() for every subject x a few paths (what decide() is built on)."""
    out = []
    for i in range(8):
        caller = Identity(IdentityKind.JWT, "idp", f"client-{i}")
        for path in (["r1"], ["r9", "x"], ["all", "a", "b"], ["r15"], ["nope"]):
            out.append(policy.candidates(caller, "GET", path))
    return out


def test_tries_of_unchanged_subjects_are_shared_with_the_previous_policy() -> None:
    grants = _grants(30)
    reuse = GrantReuse()
    first = compile_policy(decode_document(_encoded(grants), reuse=reuse))
    grants.insert(0, dataclasses.replace(grants[2], name="ns/a-new"))  # shifts every position
    grants[9] = dataclasses.replace(grants[9], rules=(Rule(frozenset({"GET"}), ("/r15",)),))
    second_doc = decode_document(_encoded(grants), reuse=reuse)
    second = compile_policy(second_doc, first)
    fresh = compile_policy(second_doc)
    assert _probe(second, grants) == _probe(fresh, grants)
    shared = {k for k, (_, node) in second._tries.items() if node is first._tries[k][1]}
    # client-2 gained a grant and ns/g008 (client-1) changed; every other subject is shared.
    assert shared == {("sub", "idp", f"client-{i}") for i in (0, 3, 4, 5, 6)}


def test_a_previous_policy_of_another_shape_is_not_reused() -> None:
    grants = _grants(10)
    reuse = GrantReuse()
    first = compile_policy(decode_document(_encoded(grants), reuse=reuse))
    other = dataclasses.replace(SERVICE, mcp_endpoints=("/mcp",))
    doc = decode_document(encode_document(make_document(other, [], grants, [])), reuse=reuse)
    second = compile_policy(doc, first)
    assert all(node is not first._tries[k][1] for k, (_, node) in second._tries.items())


def _callers(doc: PolicyDocument) -> list[Identity]:
    """An identity matching each subject of the document."""
    out = []
    for grant in doc.grants:
        for s in grant.subjects:
            if isinstance(s, ServiceAccountSubject):
                ref = ServiceAccountRef(s.namespace, s.name)
                out.append(Identity(IdentityKind.SERVICE_ACCOUNT, "k8s", "sa", service_account=ref))
            elif isinstance(s, TokenSubject):
                claims = dict(s.claims)
                out.append(Identity(IdentityKind.JWT, s.issuer, s.subject or "any", claims))
            elif isinstance(s, SpiffeSubject):
                out.append(Identity(IdentityKind.SPIFFE, "", s.spiffe_id, spiffe_id=s.spiffe_id))
    return out


@settings(max_examples=150, deadline=None)
@given(
    before=st.lists(_hyp_grant, min_size=1, max_size=6, unique_by=lambda g: g.name),
    after=st.lists(_hyp_grant, max_size=3, unique_by=lambda g: g.name),
    keep=st.integers(0, 6),
)
def test_compiling_against_the_previous_policy_decides_the_same(
    before: list[Grant], after: list[Grant], keep: int
) -> None:
    reuse = GrantReuse()
    previous = compile_policy(decode_document(_encoded(before), reuse=reuse))
    names = {g.name for g in after}
    doc = decode_document(_encoded(after + [g for g in before[:keep] if g.name not in names]),
                          reuse=reuse)  # fmt: skip
    reused, fresh = compile_policy(doc, previous), compile_policy(doc)
    for identity in _callers(doc):
        for method in ("GET", "POST"):
            for path in ([], ["a"], ["a", "x"], ["a", "x", "y"], ["%7B"]):
                got = reused.candidates(identity, method, path)
                assert got == fresh.candidates(identity, method, path)


def test_a_replica_reload_reuses_through_the_configmap_path() -> None:
    grants = _grants(12)
    reuse = GrantReuse()

    def packed(gs: list[Grant]) -> str:
        return base64.b64encode(pack_document(make_document(SERVICE, [], gs, []))).decode()

    first = _compile_packed(packed(grants), reuse, None)
    grants[4] = dataclasses.replace(grants[4], reason="changed")
    second = _compile_packed(packed(grants), reuse, first)
    assert [g is h for g, h in zip(first.grants, second.grants, strict=True)].count(False) == 1
    assert _probe(second, grants) == _probe(compile_policy(second.document), grants)
