"""The shape of the source tree, for before/after notes on refactors.

Prints the largest files, the longest functions and classes, and the import graph
between the modules of one package (`module -> the nhigate modules it imports`).

    python hack/code_shape.py [--root src] [--top 10] [--package nhigate.controller]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    """`src/nhigate/controller/run.py` -> `nhigate.controller.run` (packages drop `__init__`)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def largest_files(root: Path, top: int) -> list[tuple[int, str]]:
    """(lines, path) of the `top` longest Python files under `root`."""
    sizes = [(len(p.read_text().splitlines()), str(p)) for p in root.rglob("*.py")]
    return sorted(sizes, reverse=True)[:top]


def longest_definitions(
    root: Path, top: int
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, qualified name) of the `top` longest functions and of the `top` longest classes."""
    functions: list[tuple[int, str]] = []
    classes: list[tuple[int, str]] = []
    for path in root.rglob("*.py"):
        module = module_name(root, path)
        tree = ast.parse(path.read_text())
        for node, owner in _walk(tree, module):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            entry = (length, f"{owner}.{node.name}")
            (classes if isinstance(node, ast.ClassDef) else functions).append(entry)
    return sorted(functions, reverse=True)[:top], sorted(classes, reverse=True)[:top]


def _walk(
    node: ast.AST, owner: str
) -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, str]]:
    found: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, str]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.append((child, owner))
            found += _walk(child, f"{owner}.{child.name}")
    return found


def import_graph(root: Path, package: str) -> dict[str, list[str]]:
    """Each module of `package` -> the modules of the top-level package it imports."""
    top_level = package.split(".")[0]
    graph: dict[str, list[str]] = {}
    for path in sorted(root.joinpath(*package.split(".")).rglob("*.py")):
        module = module_name(root, path)
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from nhigate.x import y` imports module `nhigate.x.y` when there is one
                subs = {f"{node.module}.{a.name}" for a in node.names}
                subs = {n for n in subs if _is_module(root, n)}
                imported |= subs or ({node.module} if _is_module(root, node.module) else set())
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if _is_module(root, a.name)}
        graph[module] = sorted(n for n in imported if n.startswith(top_level) and n != module)
    return graph


def _is_module(root: Path, name: str) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def main() -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("src"))
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--package", default="nhigate.controller")
    args = parser.parse_args()
    print(f"## {args.top} largest files (lines)")
    for lines, path in largest_files(args.root, args.top):
        print(f"{lines:6d}  {path}")
    functions, classes = longest_definitions(args.root, args.top)
    print(f"## {args.top} longest functions (lines)")
    for lines, name in functions:
        print(f"{lines:6d}  {name}")
    print(f"## {args.top} longest classes (lines)")
    for lines, name in classes:
        print(f"{lines:6d}  {name}")
    print(f"## imports between {args.package} modules and the rest of nhigate")
    for module, imported in import_graph(args.root, args.package).items():
        print(f"{module} -> {', '.join(imported) or '-'}")


if __name__ == "__main__":
    main()
