"""Print the pipeline modules each stage command imports (transitively), for dvc.yaml deps.

Usage: python scripts/stage_deps.py [stage_module ...]   (e.g. stages/frames.py)
tests/test_dvc.py checks that dvc.yaml lists at least these for every stage.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in out if n.split(".")[0] in ("pipeline", "stages")}


def closure(start: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in imports_of(f):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # parent packages' __init__ run too
                mf = module_file(".".join(parts[:i]))
                if mf is not None and mf not in seen:
                    todo.append(mf)
    return seen


def stage_deps(stage_file: str) -> list[str]:
    files = closure(ROOT / stage_file)
    rels = sorted(str(f.relative_to(ROOT)) for f in files)
    return [r for r in rels if r.startswith("pipeline/") and not r.endswith("__init__.py")]


if __name__ == "__main__":
    default = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages").glob("*.py"))
    for arg in sys.argv[1:] or default:
        print(arg)
        for d in stage_deps(arg):
            print("   ", d)
