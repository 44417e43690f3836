#!/usr/bin/env python3
"""Write docs/api-reference.md from the pydantic models (nhigate.api.reference).

Usage: .venv/bin/python hack/generate_api_docs.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nhigate.api.reference import render_api_reference

TARGET = Path(__file__).resolve().parent.parent / "docs" / "api-reference.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    args = parser.parse_args()
    text = render_api_reference()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print("docs/api-reference.md is stale: run hack/generate_api_docs.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print("wrote docs/api-reference.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
