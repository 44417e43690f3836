"""Strict JSON for input nhigate does not take on trust: no duplicate keys, no NaN/Infinity.

The stdlib decoder accepts both (the last of two equal keys wins; `NaN`, `Infinity` and
`-Infinity` become floats), and two readers of one text can then disagree. These hooks
refuse them at any depth. Stdlib only: the policy layer reads policy documents with it and
the proxy reads JOSE headers and claims with it (after its own orjson checks).
"""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn


class StrictJsonError(ValueError):
    """A duplicate object key or a non-finite constant; the message names it."""


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook`: the object, unless a key repeats."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJsonError(f"duplicate key {key!r}"[:80])
            seen.add(key)
    return result


def reject_constant(name: str) -> NoReturn:
    """`parse_constant`: always refuses (`NaN`, `Infinity`, `-Infinity`)."""
    raise StrictJsonError(f"{name} is not a JSON number")


STRICT_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=reject_duplicate_keys, parse_constant=reject_constant
)
"""Built once (`json.loads` with hooks builds a decoder per call). Its `decode` raises
`StrictJsonError` for what the hooks refuse and `json.JSONDecodeError` for the rest, both
ValueErrors."""
