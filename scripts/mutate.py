#!/usr/bin/env python3
"""Mutation testing: break one module on purpose, one small change at a time, and see a test fail.

    .venv/bin/python scripts/mutate.py wsecho/core/idle.py tests/core/test_idle.py
    .venv/bin/python scripts/mutate.py wsecho/core/frames.py tests/core --timeout 60 --limit 100

Each mutant is one change to the module's syntax tree: a comparison flipped (``<`` ↔ ``>=``,
``==`` ↔ ``!=``, ``is`` ↔ ``is not``, ``in`` ↔ ``not in``), an integer constant ±1, ``True`` ↔
``False``, ``and`` ↔ ``or``, or a statement replaced by ``pass``. The module is rewritten, the
given tests run (``-x``, bounded by ``--timeout``), and the original is put back whatever
happens. A mutant is *killed* when a test fails, *timed out* when the tests hang (a kill too),
and *survived* when they pass: each survivor's diff is printed, to be killed by a new test or
explained as equivalent. Not part of CI: it runs the tests once per mutant.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

FLIPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}


def mutations(tree: ast.Module) -> Iterator[tuple[str, ast.Module]]:
    """Every single-change mutant of ``tree``: ``(description, mutated tree)``."""
    sites = list(ast.walk(tree))
    for index, node in enumerate(sites):
        for kind in _kinds(node):
            mutant = copy.deepcopy(tree)
            target = list(ast.walk(mutant))[index]
            description = _apply(target, kind)
            if description is not None:
                yield f"line {getattr(node, 'lineno', '?')}: {description}", mutant


def _kinds(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Compare):
        return [f"compare {i}" for i, op in enumerate(node.ops) if type(op) in FLIPS]
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return ["bool"]
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return ["plus", "minus"]
    if isinstance(node, ast.BoolOp):
        return ["boolop"]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.For | ast.While | ast.If | ast.With):
        # each statement of the body, one at a time (a docstring is left alone)
        first = 1 if node.body and isinstance(node.body[0], ast.Expr) and _is_str(node.body[0]) else 0
        return [f"delete {i}" for i in range(first, len(node.body))]
    return []


def _is_str(stmt: ast.Expr) -> bool:
    return isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _apply(node: ast.AST, kind: str) -> str | None:
    if kind.startswith("compare ") and isinstance(node, ast.Compare):
        i = int(kind.split()[1])
        old = node.ops[i]
        node.ops[i] = FLIPS[type(old)]()
        return f"{type(old).__name__} -> {type(node.ops[i]).__name__}"
    if kind == "bool" and isinstance(node, ast.Constant):
        node.value = not node.value
        return f"{not node.value} -> {node.value}"
    if kind in ("plus", "minus") and isinstance(node, ast.Constant) and isinstance(node.value, int):
        old_value = node.value
        node.value = old_value + (1 if kind == "plus" else -1)
        return f"{old_value} -> {node.value}"
    if kind == "boolop" and isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return f"-> {type(node.op).__name__.lower()}"
    if kind.startswith("delete ") and hasattr(node, "body"):
        i = int(kind.split()[1])
        body = node.body
        if isinstance(body[i], ast.Pass):
            return None
        line = getattr(body[i], "lineno", "?")
        body[i] = ast.Pass()
        return f"statement at line {line} deleted"
    return None


def run_tests(tests: list[str], timeout: float) -> str:
    """``killed``, ``survived`` or ``timed out``."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not autobahn", *tests]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    return "survived" if done.returncode == 0 else "killed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", type=Path, help="the module to mutate, like wsecho/core/idle.py")
    parser.add_argument("tests", nargs="+", help="the tests that exercise it (files or folders)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant's test run")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many mutants (0: all)")
    args = parser.parse_args()
    path: Path = args.module
    original = path.read_text(encoding="utf-8")
    if run_tests(args.tests, args.timeout) != "survived":
        print(f"mutate: the tests fail on the unmutated {path}; fix them first", file=sys.stderr)
        return 2
    counts = {"killed": 0, "survived": 0, "timed out": 0}
    survivors = []
    started = time.monotonic()
    try:
        for n, (description, mutant) in enumerate(mutations(ast.parse(original)), 1):
            if args.limit and n > args.limit:
                break
            source = ast.unparse(mutant)
            path.write_text(source, encoding="utf-8")
            verdict = run_tests(args.tests, args.timeout)
            counts[verdict] += 1
            print(f"{n:4} {verdict:9} {description}", flush=True)
            if verdict == "survived":
                baseline = ast.unparse(ast.parse(original)).splitlines()
                lines = difflib.unified_diff(baseline, source.splitlines(), lineterm="", n=1)
                survivors.append((description, "\n".join(list(lines)[2:])))
    finally:
        path.write_text(original, encoding="utf-8")
    total = sum(counts.values())
    score = 100 * (counts["killed"] + counts["timed out"]) / total if total else 100.0
    print()
    for description, change in survivors:
        print(f"-- survived: {description}\n{change}\n")
    print(
        f"mutate: {path}: {total} mutants, {counts['killed']} killed, {counts['timed out']} timed out, "
        f"{counts['survived']} survived: score {score:.1f}% ({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
