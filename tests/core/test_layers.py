"""The package's shape, read from its source: calls run one way, core ← api ← runtime ← serve.

- No import cycle among wsecho's modules (imports under ``if TYPE_CHECKING:`` count too:
  a lower layer that names a higher one's types still depends on it).
- Each layer imports only the layers below it; ``wsecho/core`` imports no asyncio, sqlite3,
  fcntl, threading or tornado and reads no clock.
- No module reads or writes another class's private attribute (``obj._name`` where
  ``_name`` is not defined in that module); the one exception, Tornado's internals in the
  take-over, is listed here with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "wsecho"

#: What each layer may import from wsecho (besides itself).
ALLOWED = {
    "core": {"core"},
    "api": {"core", "api"},
    "backends": {"core", "backends"},
    "runtime": {"core", "api", "backends", "runtime"},
    "serve": {"core", "api", "backends", "runtime", "serve"},
}
CORE_FORBIDDEN = {"asyncio", "sqlite3", "fcntl", "threading", "tornado", "time", "uvloop"}

#: Private names of other modules' objects that may be used, with the reason.
PRIVATE_ALLOWED = {
    # Tornado keeps these private; wsecho.serve.takeover is the one place that touches them,
    # behind a version check and a test that fails if Tornado renames them.
    ("wsecho.serve.takeover", "_read_buffer"),
    ("wsecho.serve.takeover", "_read_buffer_size"),
    ("wsecho.serve.takeover", "_state"),
    ("wsecho.serve.takeover", "_sockets"),
    ("wsecho.serve.takeover", "_handlers"),
    ("wsecho.serve.takeover", "_handle_connection"),
    # How many bytes a mounted socket's IOStream holds (the broadcast's slow-consumer limit).
    ("wsecho.serve.takeover", "_total_write_index"),
    ("wsecho.serve.takeover", "_total_write_done_index"),
    # The mounted path's WebSocket protocol is built like Tornado's own (get_websocket_protocol).
    ("wsecho.serve.takeover", "_WebSocketParams"),
    # An outbound WebSocket's handshake request gets the client's defaults as websocket_connect's does.
    ("wsecho.serve.takeover", "_RequestProxy"),
    ("wsecho.serve.takeover", "_DEFAULTS"),
    # The stack of the event loop's thread, for the blocked-loop warning (no public API).
    ("wsecho.runtime.watchdog", "_current_frames"),
    # os._exit is public despite its name: the second SIGTERM exits at once.
    ("wsecho.serve.signals", "_exit"),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def wsecho_imports(name: str) -> set[str]:
    """The wsecho modules ``name`` imports (submodules resolved), anywhere in its source."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.split(".")[0] == "wsecho"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "wsecho":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


def all_imports(name: str) -> set[str]:
    """Every top-level module ``name`` imports, wsecho's or not."""
    tree = ast.parse(MODULES[name].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def layer(name: str) -> str | None:
    """The layer a module belongs to; None for the top (wsecho, wsecho.testing, examples)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_the_import_graph_has_no_cycle():
    graph = {name: wsecho_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n)))
def test_each_layer_imports_only_the_layers_below_it(name):
    mine = layer(name)
    wrong = sorted(m for m in wsecho_imports(name) if layer(m) not in ALLOWED[mine])
    assert not wrong, f"{name} ({mine}) imports {wrong}; {mine} may import only {sorted(ALLOWED[mine])}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) == "core"))
def test_the_core_does_no_io_and_reads_no_clock(name):
    assert not all_imports(name) & CORE_FORBIDDEN


def private_names_defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: attributes of ``self`` it assigns, methods, class fields, slots."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
            if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
                names |= {
                    e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant) and isinstance(e.value, str)
                }
    return names


def test_no_module_touches_another_modules_private_attributes():
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        own = private_names_defined(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in own or (name, node.attr) in PRIVATE_ALLOWED:
                continue
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}")
    assert not found, "private attributes of other modules:\n" + "\n".join(found)
