"""The package's shape, as a table: modules, import floors, the largest modules and functions.

A floor is one level of pipeline-internal imports: a module that imports no other pipeline
module is on floor 1, and any module is one floor above the highest it imports. Counted twice:
over the imports at import time (what importing a module loads), and over every import,
function-level ones included. Run from the checkout: `python benchmarks/architecture.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.unit.test_architecture import import_graph, module_names  # noqa: E402

TOP = 5


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    found: dict[str, int] = {}

    def floor(module: str, path: tuple[str, ...] = ()) -> int:
        if module not in found:
            found[module] = 1 + max((floor(d, (*path, module)) for d in graph[module]
                                     if d not in path), default=0)
        return found[module]

    for module in graph:
        floor(module)
    return found


def functions(paths: dict[str, Path]) -> list[tuple[int, str]]:
    sizes = []
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(sizes, reverse=True)


def main() -> None:
    paths = module_names()
    by_floor = floors(import_graph(module_level=True))
    every = floors(import_graph())
    modules = sorted(((len(p.read_text().splitlines()), m) for m, p in paths.items()),
                     reverse=True)
    funcs = functions(paths)
    rows = [
        ("modules", str(len(paths))),
        ("import floors (at import time)", str(max(by_floor.values()))),
        ("top floor", ", ".join(sorted(m for m, f in by_floor.items()
                                       if f == max(by_floor.values())))),
        ("floor of inference.engine", str(by_floor["inference.engine"])),
        ("import floors (every import)", str(max(every.values()))),
        ("top floor", ", ".join(sorted(m for m, f in every.items()
                                       if f == max(every.values())))),
        ("modules over 400 lines", str(sum(n > 400 for n, _ in modules))),
        ("largest modules", ", ".join(f"{m} {n}" for n, m in modules[:TOP])),
        ("functions over 60 lines", str(sum(n > 60 for n, _ in funcs))),
        ("largest functions", ", ".join(f"{m} {n}" for n, m in funcs[:TOP])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
