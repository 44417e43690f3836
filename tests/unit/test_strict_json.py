"""One strict JSON reader for policy documents and JOSE: duplicates and NaN refused anywhere."""

from __future__ import annotations

import pytest
from test_policy_encoding import doc

from nhigate.policy import PolicyDocumentError, decode_document, encode_document
from nhigate.policy.strict_json import STRICT_DECODER, StrictJsonError
from nhigate.proxy.tokens import decode_json_object


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a":1,"a":2}', "duplicate key 'a'"),
        ('{"x":[{"b":1,"b":1}]}', "duplicate key 'b'"),
        ('{"x":{"y":{"\\u0000":1,"\\u0000":2}}}', "duplicate key '\\x00'"),
        ('{"x":NaN}', "NaN is not a JSON number"),
        ("[-Infinity]", "-Infinity is not a JSON number"),
        ('{"x":Infinity}', "Infinity is not a JSON number"),
    ],
)
def test_strict_decoder_refuses_and_names_what(text: str, message: str) -> None:
    with pytest.raises(StrictJsonError) as caught:
        STRICT_DECODER.decode(text)
    assert str(caught.value) == message


def test_strict_decoder_keeps_what_is_strict() -> None:
    assert STRICT_DECODER.decode('{"a":{"b":[1,2.5,"c",null]},"b":true}') == {
        "a": {"b": [1, 2.5, "c", None]},
        "b": True,
    }


def test_a_huge_duplicate_key_is_named_briefly() -> None:
    key = "k" * 10_000
    with pytest.raises(StrictJsonError) as caught:
        STRICT_DECODER.decode(f'{{"{key}":1,"{key}":2}}')
    assert len(str(caught.value)) <= 80


def test_tokens_and_policy_documents_refuse_duplicates_the_same_way() -> None:
    with pytest.raises(ValueError, match="duplicate key 'b'"):
        decode_json_object(b'{"a":{"b":1,"b":2}}')
    data = encode_document(doc())
    duplicated = data.replace(b'"reason":"JIRA-123"', b'"reason":"x","reason":"JIRA-123"', 1)
    with pytest.raises(PolicyDocumentError, match="document: duplicate key 'reason'"):
        decode_document(duplicated)
    with pytest.raises(PolicyDocumentError, match="document: NaN is not a JSON number"):
        decode_document(data.replace(b'"burst":100', b'"burst":NaN', 1))
