#!/usr/bin/env python3
"""Mutation testing: break one module on purpose, one small change at a time, and see a test fail.

    .venv/bin/python scripts/mutate.py wsecho/core/idle.py tests/core/test_idle.py
    .venv/bin/python scripts/mutate.py wsecho/core/frames.py tests/core/test_frames.py -j 2 --timeout 60

Each mutant is one change to the module's syntax tree: a comparison flipped (``<`` ↔ ``>=``,
``==`` ↔ ``!=``, ``is`` ↔ ``is not``, ``in`` ↔ ``not in``), an integer constant ±1, ``True`` ↔
``False``, ``and`` ↔ ``or``, or a statement replaced by ``pass``. The given tests run against
each mutant (``-x``, without the Autobahn-marked tests, bounded by ``--timeout`` per mutant and
``--budget`` in all). The module on disk is never rewritten: each run is a forked process in
which an import hook serves the mutated source under the module's name, so the working tree
can be edited meanwhile and ``-j 2`` runs two mutants at once. A mutant is *killed* when a test
fails, *timed out* when the tests hang (a kill too), and *survived* when they pass.

A survivor is killed by a new test or explained as equivalent in the table under "Equivalent
mutants" of docs/mutation-testing.md, keyed by module, the text of the mutated source line and
the mutation (not the line number, so that an entry follows its line when code moves, and
stops matching when the line changes). The score is printed raw and with the listed
equivalents counted as explained; entries that no longer match a survivor are named, to be
removed. Not part of CI: it runs the tests once per mutant.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import difflib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import signal
import sys
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

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
EQUIVALENTS = Path(__file__).resolve().parent.parent / "docs" / "mutation-testing.md"
# Imported once in the parent so that each forked run starts with them loaded: never wsecho, and
# never a pytest plugin (hypothesis, pytest_tornado), which pytest must import itself to rewrite.
PRELOAD = ("pytest", "tornado.web", "tornado.websocket", "websockets", "attrs", "asyncio")


@attrs.frozen
class Mutant:
    number: int
    line: int
    scope: str  # the innermost class or function around the line, like "IdleIndex.touch"
    mutation: str  # "Lt -> GtE", "delete", "3 -> 4", "and -> or", "True -> False"
    source: str

    def describe(self) -> str:
        return f"line {self.line}: {self.mutation}"


def scopes(tree: ast.Module) -> dict[int, str]:
    """Line -> the qualified name of the innermost class or function it is in (none: module)."""
    found: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                for line in range(first, (child.end_lineno or child.lineno) + 1):
                    found[line] = name
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def mutations(tree: ast.Module) -> Iterator[tuple[int, str, ast.Module]]:
    """Every single-change mutant of ``tree``: ``(line, mutation, mutated tree)``."""
    sites = list(ast.walk(tree))
    for index, node in enumerate(sites):
        for kind in _kinds(node):
            mutant = copy.deepcopy(tree)
            target = list(ast.walk(mutant))[index]
            applied = _apply(target, kind)
            if applied is not None:
                yield applied[0], applied[1], mutant


def _kinds(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Compare):
        return [f"compare {i}" for i, op in enumerate(node.ops) if type(op) in FLIPS]
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return ["bool"]
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return ["plus", "minus"]
    if isinstance(node, ast.BoolOp):
        return ["boolop"]
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return []  # imports for the type checker only: deleting them changes nothing at run time
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.For | ast.While | ast.If | ast.With):
        # each statement of the body, one at a time (a docstring is left alone)
        first = 1 if node.body and isinstance(node.body[0], ast.Expr) and _is_str(node.body[0]) else 0
        return [f"delete {i}" for i in range(first, len(node.body))]
    return []


def _is_str(stmt: ast.Expr) -> bool:
    return isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _is_ellipsis(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis


def _apply(node: ast.AST, kind: str) -> tuple[int, str] | None:
    line: int = getattr(node, "lineno", 0)
    if kind.startswith("compare ") and isinstance(node, ast.Compare):
        i = int(kind.split()[1])
        old = node.ops[i]
        node.ops[i] = FLIPS[type(old)]()
        return line, f"{type(old).__name__} -> {type(node.ops[i]).__name__}"
    if kind == "bool" and isinstance(node, ast.Constant):
        node.value = not node.value
        return line, f"{not node.value} -> {node.value}"
    if kind in ("plus", "minus") and isinstance(node, ast.Constant) and isinstance(node.value, int):
        old_value = node.value
        node.value = old_value + (1 if kind == "plus" else -1)
        return line, f"{old_value} -> {node.value}"
    if kind == "boolop" and isinstance(node, ast.BoolOp):
        old_op = type(node.op).__name__.lower()
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return line, f"{old_op} -> {type(node.op).__name__.lower()}"
    if kind.startswith("delete ") and isinstance(
        node, ast.FunctionDef | ast.AsyncFunctionDef | ast.For | ast.While | ast.If | ast.With
    ):
        i = int(kind.split()[1])
        if isinstance(node.body[i], ast.Pass) or _is_ellipsis(node.body[i]):
            return None  # no change at all (a Protocol's "...", like "pass")
        deleted = node.body[i].lineno
        node.body[i] = ast.Pass()
        return deleted, "delete"
    return None


# -- the known equivalents ---------------------------------------------------------------------


@attrs.frozen
class Equivalent:
    module: str
    scope: str
    code: str  # the mutated line's text, stripped
    mutation: str
    reason: str


def read_equivalents(document: Path) -> list[Equivalent]:
    """The rows of the table under the "Equivalent mutants" heading of ``document``.

    A row is ``| `module` | `scope` | `code` | mutation | reason |``; a ``|`` inside the code
    is written ``\\|``.
    """
    if not document.exists():
        return []
    found = []
    inside = False
    for line in document.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            inside = line.lstrip("#").strip().lower() == "equivalent mutants"
            continue
        if not inside or not line.startswith("|"):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue  # the header and its rule
        module, scope, code, mutation, reason = (cell.strip("`") if i < 4 else cell for i, cell in enumerate(cells))
        found.append(Equivalent(module, scope, code, mutation, reason))
    return found


def explained(mutant: Mutant, module: str, lines: Sequence[str], equivalents: Sequence[Equivalent]) -> bool:
    code = lines[mutant.line - 1].strip() if 0 < mutant.line <= len(lines) else ""
    return any(
        (e.module, e.scope, e.code, e.mutation) == (module, mutant.scope, code, mutant.mutation) for e in equivalents
    )


# -- running the tests against a mutant in a forked process --------------------------------------


@attrs.frozen
class _Loader(importlib.abc.Loader):
    source: str
    filename: str

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        exec(compile(self.source, self.filename, "exec"), module.__dict__)


@attrs.frozen
class _MutantFinder(importlib.abc.MetaPathFinder):
    """Serves the mutated source under the module's own name and file."""

    name: str
    loader: _Loader

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, self.loader.filename, loader=self.loader)


def start(name: str, filename: str, source: str | None, tests: Sequence[str]) -> int:
    """Fork a process that runs ``tests`` with ``source`` as module ``name`` (None: unmutated)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setpgid(0, 0)  # its own group, so that a timeout stops what the tests started too
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if source is not None:
            sys.meta_path.insert(0, _MutantFinder(name, _Loader(source, filename)))
        import pytest

        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-m", "not autobahn", *tests])
        os._exit(int(code))
    except BaseException:  # noqa: BLE001 - whatever it is, the forked process must end here
        os._exit(3)


def verdict(status: int) -> str:
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "survived"
    return "killed"


def run_all(
    name: str,
    filename: str,
    jobs: list[tuple[int, str | None]],
    tests: Sequence[str],
    parallel: int,
    timeout: float,
    budget: float,
) -> Iterator[tuple[int, str]]:
    """Run each ``(number, source)``; yield ``(number, verdict)`` as they finish."""
    started = time.monotonic()
    pending = list(reversed(jobs))
    running: dict[int, tuple[int, float]] = {}
    try:
        yield from _run(name, filename, pending, running, tests, parallel, timeout, started + budget)
    finally:
        for pid in running:  # interrupted (or SIGTERM, see main): stop what still runs
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _run(
    name: str,
    filename: str,
    pending: list[tuple[int, str | None]],
    running: dict[int, tuple[int, float]],
    tests: Sequence[str],
    parallel: int,
    timeout: float,
    deadline: float,
) -> Iterator[tuple[int, str]]:
    while pending or running:
        while pending and len(running) < parallel and time.monotonic() < deadline:
            number, source = pending.pop()
            running[start(name, filename, source, tests)] = (number, time.monotonic())
        if not running:
            return  # the budget is spent
        time.sleep(0.02)
        for pid, (number, since) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del running[pid]
                yield number, verdict(status)
            elif time.monotonic() - since > timeout:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del running[pid]
                yield number, "timed out"


def module_name(path: Path) -> str:
    relative = path.resolve().relative_to(Path.cwd().resolve()).with_suffix("")
    return ".".join(relative.parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", type=Path, help="the module to mutate, like wsecho/core/idle.py (from the repo root)")
    parser.add_argument("tests", nargs="+", help="the tests that exercise it (files or folders)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant's test run (default 60)")
    parser.add_argument(
        "--budget",
        type=float,
        default=3600.0,
        help="seconds in all; mutants not started by then are not run (default 3600)",
    )
    parser.add_argument("-j", "--jobs", type=int, choices=(1, 2), default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--lines", default="", help="only mutants of these lines, like 40-75")
    parser.add_argument(
        "--rerun", type=Path, help="only the mutants an earlier run's output lists as survived (same module text)"
    )
    parser.add_argument("--limit", type=int, default=0, help="stop after this many mutants (0: all)")
    parser.add_argument("--equivalents", type=Path, default=EQUIVALENTS, help="the list of known equivalents")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # runs the cleanup above
    path: Path = args.module
    name = module_name(path)
    if any(m == "wsecho" or m.startswith("wsecho.") for m in sys.modules):
        print("mutate: wsecho is imported before the fork; the mutants would not be seen", file=sys.stderr)
        return 2
    for preload in PRELOAD:
        importlib.import_module(preload)
    original = path.read_text(encoding="utf-8")
    lines = original.splitlines()
    filename = str(path.resolve())
    baseline_started = time.monotonic()
    if [v for _, v in run_all(name, filename, [(0, None)], args.tests, 1, args.timeout * 4, args.timeout * 4)] != [
        "survived"
    ]:
        print(f"mutate: the tests fail (or hang) on the unmutated {path}; fix them first", file=sys.stderr)
        return 2
    print(f"mutate: {name}: the tests pass unmutated in {time.monotonic() - baseline_started:.1f} s", flush=True)
    low, _, high = args.lines.partition("-")
    again = None
    if args.rerun:
        found = re.findall(r"^ *\d+ survived +(line \d+: .*)$", args.rerun.read_text(encoding="utf-8"), re.MULTILINE)
        again = set(found)
    mutants: list[Mutant] = []
    scope_of = scopes(ast.parse(original))
    for line, mutation, tree in mutations(ast.parse(original)):
        if args.lines and not int(low) <= line <= int(high or low):
            continue
        if again is not None and f"line {line}: {mutation}" not in again:
            continue
        scope = scope_of.get(line, "<module>")
        mutants.append(Mutant(len(mutants) + 1, line, scope, mutation, ast.unparse(tree)))
        if args.limit and len(mutants) == args.limit:
            break
    by_number = {m.number: m for m in mutants}
    equivalents = [e for e in read_equivalents(args.equivalents) if e.module == str(path)]
    counts = {"killed": 0, "survived": 0, "timed out": 0}
    survivors: list[Mutant] = []
    started = time.monotonic()
    jobs: list[tuple[int, str | None]] = [(m.number, m.source) for m in mutants]
    for number, outcome in run_all(name, filename, jobs, args.tests, args.jobs, args.timeout, args.budget):
        counts[outcome] += 1
        print(f"{number:4} {outcome:9} {by_number[number].describe()}", flush=True)
        if outcome == "survived":
            survivors.append(by_number[number])
    baseline = ast.unparse(ast.parse(original)).splitlines()
    known = [m for m in survivors if explained(m, str(path), lines, equivalents)]
    print()
    for mutant in sorted(survivors, key=lambda m: m.number):
        where = f"{mutant.describe()} in {mutant.scope}: {lines[mutant.line - 1].strip()}"
        if mutant in known:
            print(f"-- survived, listed as equivalent: {where}")
            continue
        change = difflib.unified_diff(baseline, mutant.source.splitlines(), lineterm="", n=1)
        print(f"-- survived: {where}\n" + "\n".join(list(change)[2:]) + "\n")
    for entry in equivalents:
        matched = sum(explained(m, str(path), lines, [entry]) for m in survivors)
        if matched > 1:
            print(f"-- one listed equivalent explains {matched} survivors (check each): {entry.scope}: {entry.code}")
        elif not matched and not (args.lines or args.limit or args.rerun):
            print(f"-- listed as equivalent, not a survivor (killed, or changed): {entry.scope}: {entry.code}")
    total = sum(counts.values())
    not_run = len(mutants) - total
    raw = 100 * (counts["killed"] + counts["timed out"]) / total if total else 100.0
    with_known = 100 * (counts["killed"] + counts["timed out"] + len(known)) / total if total else 100.0
    print(
        f"mutate: {path}: {total} mutants, {counts['killed']} killed, {counts['timed out']} timed out, "
        f"{counts['survived']} survived ({len(known)} of them listed as equivalent): "
        f"score {raw:.1f}%, {with_known:.1f}% with the equivalents explained"
        + (f"; {not_run} not run (budget spent)" if not_run else "")
        + ("; a subset (--lines, --limit or --rerun)" if args.lines or args.limit or args.rerun else "")
        + f" ({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
