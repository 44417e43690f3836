"""Reload path: packed (gzip) documents, bounded unpacking, and the fast decode paths.

The fast paths (canonical-input decode, location-free grant validation) must accept
nothing the strict validator rejects and build exactly what it builds.
"""

from __future__ import annotations

import copy
import gc
import gzip
import json
import tracemalloc
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy_encoding import GRANTS, ISSUERS, REVOCATIONS, SERVICE, _hyp_grant, doc

from nhigate.policy import (
    Facts,
    Grant,
    Identity,
    IdentityKind,
    PolicyDocumentError,
    Reason,
    Rule,
    ServiceConfig,
    TokenSubject,
    compile_policy,
    decide,
    decode_document,
    encode_document,
    encoding,
    make_document,
    pack_document,
    unpack_document,
)
from nhigate.policy.allocation import gc_paused

MiB = 1024 * 1024
NOW = 1_800_000_000.0


def _many_grants(n: int) -> list[Grant]:
    return [
        Grant(
            f"ns/g{i:05d}",
            (TokenSubject("idp", f"client-{i % 7}"),),
            (Rule(frozenset({"GET", "HEAD"}), (f"/v1/res{i}", f"/v1/res{i}/*/history")),),
            expires_at=NOW + i,
        )
        for i in range(n)
    ]


# --- pack / unpack --------------------------------------------------------------------------


def test_pack_round_trip_is_deterministic_gzip_of_the_canonical_json() -> None:
    d = doc()
    packed = pack_document(d)
    assert packed[:2] == b"\x1f\x8b"
    assert packed[4:8] == b"\0\0\0\0"  # mtime 0: same document, same bytes
    assert gzip.decompress(packed) == encode_document(d)
    assert unpack_document(packed) == d
    assert pack_document(unpack_document(packed)) == packed
    assert pack_document(make_document(SERVICE, ISSUERS[::-1], GRANTS, REVOCATIONS)) == packed


def test_a_10k_grant_document_packs_under_the_configmap_limit() -> None:
    d = make_document(ServiceConfig("ns", "api", "api", 80), [], _many_grants(10_000), [])
    packed = pack_document(d)
    assert len(encode_document(d)) > 1 * MiB  # the reason to pack
    assert len(packed) < MiB // 2
    assert unpack_document(packed) == d


def _gzip_of_zeros(size: int) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(MiB)
    parts = [deflater.compress(chunk) for _ in range(size // MiB)]
    return b"".join([*parts, deflater.flush()])


def test_gzip_bomb_is_refused_without_holding_its_output() -> None:
    bomb = _gzip_of_zeros(160 * MiB)
    assert len(bomb) < MiB
    tracemalloc.start()
    try:
        with pytest.raises(PolicyDocumentError, match="more than 67108864 bytes"):
            unpack_document(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The 64 MiB limit, one 1 MiB inflate chunk, the input: never the bomb's 160 MiB (nor
    # the 2x a one-shot bounded inflate would reach).
    assert peak < 68 * MiB


@pytest.mark.parametrize("slack", [0, 1])
def test_unpack_limit_is_exact(slack: int) -> None:
    d = doc()
    size = len(encode_document(d))
    if slack:
        assert unpack_document(pack_document(d), max_bytes=size) == d
    else:
        with pytest.raises(PolicyDocumentError, match="more than"):
            unpack_document(pack_document(d), max_bytes=size - 1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (encode_document(doc()), "not valid gzip"),
        (pack_document(doc())[:-5], "truncated"),
        (pack_document(doc())[:40], "truncated"),
        (pack_document(doc()) + b"x", "after the gzip stream"),
        (pack_document(doc()) + pack_document(doc()), "after the gzip stream"),
        (zlib.compress(encode_document(doc())), "not valid gzip"),  # zlib, not gzip
        (gzip.compress(b'{"apiVersion": "nhigate.io/policy-v1"}', mtime=0), "version"),
        (gzip.compress(b"\xff\xfe", mtime=0), "not valid JSON"),
    ],
)
def test_unpack_rejects(data: bytes, message: str) -> None:
    with pytest.raises(PolicyDocumentError, match=message):
        unpack_document(data)


def test_unpack_rejects_a_corrupted_checksum() -> None:
    packed = bytearray(pack_document(doc()))
    packed[-6] ^= 0xFF  # CRC32 lives in the 8-byte trailer
    with pytest.raises(PolicyDocumentError, match="gzip"):
        unpack_document(bytes(packed))


def test_unpack_rejects_non_bytes() -> None:
    with pytest.raises(PolicyDocumentError, match="expected gzip bytes"):
        unpack_document("not bytes")  # type: ignore[arg-type]


# --- decode fast path vs strict path -------------------------------------------------------


def test_non_canonical_but_valid_documents_still_decode_to_the_same_thing() -> None:
    d = doc()
    pretty = json.dumps(json.loads(encode_document(d)), indent=2, sort_keys=False).encode()
    assert encoding._decode_canonical(pretty) is None  # took the strict path...
    assert decode_document(pretty) == d  # ...with the same answer


def test_duplicate_keys_inside_a_grant_are_still_rejected() -> None:
    data = encode_document(doc())
    duplicated = data.replace(b'"reason":"JIRA-123"', b'"reason":"x","reason":"JIRA-123"', 1)
    assert duplicated != data
    with pytest.raises(PolicyDocumentError, match="duplicate key"):
        decode_document(duplicated)


def test_canonical_documents_take_the_fast_path() -> None:
    d = doc()
    assert encoding._decode_canonical(encode_document(d)) == d


_ODD_VALUES = [
    None, "", "x", 0, 1, -1, True, False, 1.5, float("inf"), [], [""], ["GET"], {}, {"a": 1},
    {"a": "b"}, "GET", "get", "*", "/", "/a", "/a//b", "/a/../b", "/a/**", "/**/a", "/%2F",
    "spiffe://", "spiffe://td/x", "2027-01-15T08:00:00Z", "2027-01-15T08:00:00.000000Z",
    "2027-02-30T08:00:00Z", {"requestsPerSecond": 0, "burst": 1},
    {"requestsPerSecond": 1, "burst": 1}, {"issuer": "i", "subject": None, "claims": {}},
    {"namespace": "n", "name": ""}, [{"spiffeId": "spiffe://td/x"}],
]  # fmt: skip


def _slots(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) position in a JSON tree."""
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((value, key))
            _slots(item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((value, index))
            _slots(item, out)
    return out


def _strict(value: Any) -> Grant | None:
    try:
        return encoding._grant(value, "g")
    except PolicyDocumentError:
        return None


@settings(max_examples=400, deadline=None)
@given(grant=_hyp_grant, data=st.data())
def test_fast_grant_validation_agrees_with_the_strict_validator(grant: Grant, data: Any) -> None:
    grant_json = json.loads(encode_document(make_document(SERVICE, [], [grant], [])))["grants"][0]
    assert encoding._fast_grant(grant_json) == _strict(grant_json)  # valid: same Grant
    mutated = copy.deepcopy(grant_json)
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = data.draw(st.sampled_from(_slots(mutated, [])))
        action = data.draw(st.sampled_from(["replace", "delete", "extra"]))
        if action == "replace":
            container[key] = copy.deepcopy(data.draw(st.sampled_from(_ODD_VALUES)))
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container["unexpected"] = 1
        else:
            container.append(copy.deepcopy(data.draw(st.sampled_from(_ODD_VALUES))))
    fast = encoding._fast_grant(mutated)
    assert fast is None or fast == _strict(mutated)


# --- compile --------------------------------------------------------------------------------


def test_decisions_are_built_once_and_shared() -> None:
    grants = [
        Grant("ns/live", (TokenSubject("idp", "a"),), (Rule(frozenset({"GET"}), ("/x",)),)),
        Grant("ns/old", (TokenSubject("idp", "a"),), (Rule(frozenset({"GET"}), ("/y",)),),
              expires_at=NOW - 1),
    ]  # fmt: skip
    policy = compile_policy(make_document(SERVICE, [], grants, []))
    caller = Identity(IdentityKind.JWT, "idp", "a")
    first = decide(policy, Facts(caller, "GET", "/x", NOW))
    assert (first.allowed, first.grant) == (True, "ns/live")
    assert decide(policy, Facts(caller, "GET", "/x", NOW)) is first
    expired = decide(policy, Facts(caller, "GET", "/y", NOW))
    assert (expired.reason, expired.grant) == (Reason.GRANT_EXPIRED, "ns/old")
    assert decide(policy, Facts(caller, "GET", "/y", NOW)) is expired


def test_one_subject_with_thousands_of_grants_on_one_pattern() -> None:
    # Every grant lands in the same trie bucket: insertion must not rescan it (quadratic).
    grants = [
        Grant(f"ns/g{i:05d}", (TokenSubject("idp", "heavy"),),
              (Rule(frozenset({"GET"}), ("/**",)),), expires_at=NOW - 1 if i else NOW + 60)
        for i in range(5000)
    ]  # fmt: skip
    policy = compile_policy(make_document(SERVICE, [], grants, []))
    facts = Facts(Identity(IdentityKind.JWT, "idp", "heavy"), "GET", "/a/b", NOW)
    assert policy.candidates(facts.identity, "GET", ["a", "b"]) == list(range(5000))
    assert decide(policy, facts).grant == "ns/g00000"


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_restores_the_collector_state(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), gc_paused():
            raise RuntimeError("boom")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


# --- make / encode --------------------------------------------------------------------------


def test_encode_of_a_made_document_reuses_its_canonical_bytes_while_it_lives() -> None:
    d = doc()
    fresh = encoding._with_version(encoding._content_bytes(d), d.version)
    assert encode_document(d) is encode_document(d)  # the bytes make_document produced
    assert encode_document(d) == fresh
    decoded = decode_document(fresh)
    assert encoding._known_encoding(decoded) is None  # only make_document's output is kept
    assert encode_document(decoded) == fresh
    key = id(d)
    assert key in encoding._ENCODED
    del d
    gc.collect()
    assert key not in encoding._ENCODED  # forgotten with the document


def test_already_canonical_grants_are_reused_and_others_rebuilt() -> None:
    canonical = make_document(SERVICE, [], GRANTS, []).grants
    assert all(encoding._canonical_grant(g) is g for g in canonical)
    messy = Grant(
        "ns/messy",
        (TokenSubject("idp", "b"), TokenSubject("idp", "a"), TokenSubject("idp", "b")),
        (Rule(frozenset({"GET"}), ("/z", "/a", "/z")), Rule(frozenset({"GET"}), ("/a", "/z"))),
        expires_at=NOW + 0.0000004,
    )
    tidy = encoding._canonical_grant(messy)
    assert tidy.subjects == (TokenSubject("idp", "a"), TokenSubject("idp", "b"))
    assert tidy.rules == (Rule(frozenset({"GET"}), ("/a", "/z")),)
    assert tidy.expires_at == NOW
    assert encoding._canonical_grant(tidy) is tidy
