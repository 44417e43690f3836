#!/usr/bin/env python3
"""Write crds/<plural>.nhigate.io.yaml from the pydantic models (nhigate.api.crds).

Usage: .venv/bin/python hack/generate_crds.py [--check]
With --check, write nothing and exit 1 when crds/ is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nhigate.api.crds import build_crds

CRD_DIR = Path(__file__).resolve().parent.parent / "crds"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when crds/ is stale")
    args = parser.parse_args()
    wanted = build_crds()
    stale = [
        name
        for name, text in wanted.items()
        if not (CRD_DIR / name).is_file() or (CRD_DIR / name).read_text() != text
    ]
    if args.check:
        for name in stale:
            print(f"crds/{name} is out of date: run hack/generate_crds.py", file=sys.stderr)
        return 1 if stale else 0
    CRD_DIR.mkdir(exist_ok=True)
    for name, text in wanted.items():
        (CRD_DIR / name).write_text(text)
        print(f"wrote crds/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
