"""The application's code: importing ``module:attr`` at start, importing it afresh for a code
reload (``--reload-code``, ``--reload``), and noticing that its files changed.

Which modules are the application's: the app module and every module loaded from the
directory of its top-level package (or, for a module that is no package, from its own
directory), except wsecho's own, other installed code (site-packages, the standard library;
an application installed as a package keeps its own package) and extension modules, which
Python cannot load twice. A reload takes them all out of
``sys.modules`` and imports the app module again, so the application's modules run afresh
in the order it imports them (``importlib.reload`` would run one module again inside the
old one's namespace, leaving names the new code removed and the modules it imports as they
were). An import that fails puts every old module back (docs/decisions/0009-reload-code.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from wsecho.api.app import App
from wsecho.core.errors import AppLoadError, ConfigError
from wsecho.core.wording import counted

if TYPE_CHECKING:
    from collections.abc import Callable

    from wsecho.runtime.runtime import Runtime

log = logging.getLogger("wsecho")

IMPORTLIB_DIR = os.path.dirname(importlib.__file__)
WSECHO_DIR = Path(__file__).resolve().parent.parent
#: Where installed code lives: never reloaded, even when an application is installed there.
INSTALLED_DIRS = tuple(
    Path(p).resolve() for p in {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} if p
)


def load_app(spec: str) -> App:
    """Import ``module:attr`` (``module`` alone means ``module:app``), like uvicorn."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        msg = f"cannot load {spec!r}: expected MODULE or MODULE:ATTR"
        raise AppLoadError(msg)
    # Like uvicorn: modules in the working directory are importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        msg = f"cannot load {spec!r}: {exc.filename}, line {exc.lineno}: {exc.msg}"
        raise AppLoadError(msg) from exc
    except ImportError as exc:
        missing_app = exc.name is not None and (module_name + ".").startswith(exc.name + ".")
        msg = f"cannot load {spec!r}: {exc}{'' if missing_app else _origin(exc)}"
        raise AppLoadError(msg) from exc
    except Exception as exc:
        # The module's own code raised while it was imported.
        msg = f"cannot load {spec!r}: importing it raised {type(exc).__name__}: {exc}{_origin(exc)}"
        raise AppLoadError(msg) from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        msg = f"cannot load {spec!r}: {module_name}.{attr} must be a wsecho.App, found {found}"
        raise AppLoadError(msg)
    return app


def _origin(exc: BaseException) -> str:
    """`` (FILE, line N)``: the deepest frame of the application's code that raised ``exc``, so
    that one line points at it where a traceback would bury it under importlib's frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen ", IMPORTLIB_DIR)) and f.filename != __file__
    ]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _source(module: ModuleType) -> Path | None:
    """The module's ``.py`` file, or None (a namespace package, an extension, a built-in)."""
    name = getattr(module, "__file__", None)
    if not name or not name.endswith(".py"):
        return None
    return Path(name).resolve()


def _root(module: ModuleType) -> Path | None:
    """The directory whose modules belong to the application of ``module``."""
    path = _source(module)
    if path is None:
        return None
    top = module.__name__.partition(".")[0]
    depth = module.__name__.count(".") + (1 if path.name == "__init__.py" else 0)
    root = path.parents[depth - 1] if depth else path.parent
    if top == "wsecho":
        root = path.parent  # an example shipped with wsecho: its own directory only
    if root in INSTALLED_DIRS:
        return None  # an installed top-level module: only the module itself
    return root


def app_modules(spec: str) -> dict[str, ModuleType]:
    """The loaded modules of the application ``spec`` names (see the module docstring)."""
    name = spec.partition(":")[0]
    module = sys.modules.get(name)
    if module is None:
        return {}
    root = _root(module)
    found = {name: module}
    if root is None:
        return found
    for other_name, other in list(sys.modules.items()):
        path = _source(other) if other is not None else None
        if path is None or not path.is_relative_to(root) or path.is_relative_to(WSECHO_DIR):
            continue
        if any(path.is_relative_to(d) and not root.is_relative_to(d) for d in INSTALLED_DIRS):
            continue  # installed code under the application's directory (a venv in it)
        found[other_name] = other
    return found


def source_files(spec: str) -> list[Path]:
    """The ``.py`` files of the application's loaded modules (what ``--reload`` watches)."""
    return sorted({p for m in app_modules(spec).values() if (p := _source(m)) is not None})


def reimport(spec: str, check: Callable[[App], None] = lambda app: None) -> App:
    """Import the application of ``spec`` afresh (every module of it runs again) and
    ``check`` it; when either raises (:class:`AppLoadError`, :class:`ConfigError`), put the
    old modules back and raise."""
    old = app_modules(spec)
    for name, module in old.items():
        path = _source(module)
        if path is not None:
            # Python checks a cached .pyc against the source's mtime (in whole seconds) and
            # size: an edit within the same second that keeps the size would be missed.
            with contextlib.suppress(OSError, NotImplementedError, ValueError):
                os.unlink(importlib.util.cache_from_source(str(path)))
        del sys.modules[name]
    importlib.invalidate_caches()
    try:
        app = load_app(spec)
        check(app)
    except (AppLoadError, ConfigError):
        for name in [n for n, m in sys.modules.items() if n not in old and m is not None and _is_new(m, old)]:
            del sys.modules[name]
        sys.modules.update(old)
        for name, module in old.items():
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)  # what `import a.b` reads
        raise
    return app


def _is_new(module: ModuleType, old: dict[str, ModuleType]) -> bool:
    """Whether ``module`` was imported by a failed re-import from the application's files."""
    path = _source(module)
    roots = {r for m in old.values() if (r := _root(m)) is not None}
    return path is not None and any(path.is_relative_to(r) for r in roots)


class Watcher:
    """For ``--reload``: which of the application's files changed since the last look."""

    def __init__(self, spec: str) -> None:
        self._spec = spec
        self._seen = self._stat()

    def _stat(self) -> dict[Path, tuple[int, int]]:
        seen = {}
        for path in source_files(self._spec):
            with contextlib.suppress(OSError):  # a file being replaced: seen at the next look
                st = path.stat()
                seen[path] = (st.st_mtime_ns, st.st_size)
        return seen

    def changed(self) -> Path | None:
        """A file that changed (or appeared among the application's) since the last call."""
        now = self._stat()
        changed = next((p for p, v in now.items() if self._seen.get(p) != v), None)
        self._seen = now
        return changed

    def rescan(self) -> None:
        """After a reload: the application's modules (and so its files) may differ."""
        self._seen = self._stat()


#: How long a code reload waits for the running turns (and their commits) to finish.
RELOAD_TIMEOUT = 10.0
#: How often ``--reload`` looks at the application's files.
WATCH_INTERVAL = 0.5


class CodeReloader:
    """Reloads the application's code inside a running runtime, one reload at a time.

    The new code is imported first, while the old code serves; then events are held (in
    order), the running turns and their commits finish (at most ``timeout`` seconds), every
    object that can hibernates, the namespaces are bound to the new classes and the held
    events are delivered: the next event of each object constructs the new class.
    """

    def __init__(self, runtime: Runtime, spec: str, timeout: float = RELOAD_TIMEOUT) -> None:
        self.runtime = runtime
        self.spec = spec
        self.timeout = timeout
        #: Why the last reload failed (the previous code still serves), or None.
        self.failure: str | None = None
        self.watcher: Watcher | None = None
        self._task: asyncio.Future[None] | None = None
        #: A reload asked for while one runs: it runs after it (the files may have changed again).
        self._again: str | None = None

    def request(self, trigger: str) -> None:
        """Reload soon (from a signal handler or the watcher)."""
        if self._task is not None:
            self._again = trigger
            return
        self._task = asyncio.ensure_future(self._reload_until_done(trigger))

    async def _reload_until_done(self, trigger: str) -> None:
        try:
            next_trigger: str | None = trigger
            while next_trigger is not None:
                await self.reload(next_trigger)
                next_trigger, self._again = self._again, None
        finally:
            self._task = None

    async def wait(self) -> None:
        """Return once no reload runs (tests, and a stop that must not cut one in half)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def reload(self, trigger: str) -> bool:
        """One reload; False (logged, and kept for /readyz) when the new code does not load."""
        runtime = self.runtime
        try:
            app = reimport(self.spec, check=runtime.check_classes)
        except (AppLoadError, ConfigError) as exc:
            runtime.stats.code_reloads["failed"] += 1
            self.failure = f"code reload ({trigger}) failed, the previous code serves: {exc}"
            log.error("%s", self.failure, exc_info=exc.__cause__ or exc)
            return False
        awake_before = sum(1 for h in runtime.hosts() if h.instance is not None)
        runtime.hold_events()
        try:
            awake = await runtime.quiesce(self.timeout)
            runtime.rebind(app)
        finally:
            held = runtime.release_events()
        runtime.stats.code_reloads["ok"] += 1
        self.failure = None
        if self.watcher is not None:
            self.watcher.rescan()
        log.info(
            "code reloaded (%s): %s hibernated, %s held meanwhile went to the new code",
            trigger,
            counted(awake_before - len(awake), "object"),
            counted(held, "event"),
        )
        if awake:
            reasons = sorted({runtime.hibernation_blocker(h) or "a turn still runs" for h in awake})
            log.warning(
                "%s could not hibernate within %gs (%s): each keeps the previous code until it next hibernates",
                counted(len(awake), "object"),
                self.timeout,
                "; ".join(reasons),
            )
        return True

    def watch(self) -> None:
        """``--reload``: reload when one of the application's files changed (periodic)."""
        if self.watcher is None:
            self.watcher = Watcher(self.spec)
            return
        path = self.watcher.changed()
        if path is not None:
            log.info("%s changed: reloading the application's code", path)
            self.request(f"{path.name} changed")
