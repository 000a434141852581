"""``App``: an application's worker ``fetch`` and its bindings (the role of ``wrangler.toml``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from wsecho.api.objects import DurableObject
from wsecho.core.errors import InvalidArgumentError
from wsecho.core.fanout import MIN_QUEUE_BYTES, policy_for

if TYPE_CHECKING:
    from wsecho.api.http import Request, Response

WorkerFetch = Callable[["Request", Any], "Response | Awaitable[Response]"]


def _check_bindings(_: object, __: object, bindings: Mapping[str, type[DurableObject]]) -> None:
    for name, cls in bindings.items():
        if not isinstance(name, str) or not name.isidentifier():
            msg = f"binding names must be Python identifiers (env.NAME), got {name!r}"
            raise InvalidArgumentError(msg)
        if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
            msg = f"binding {name!r} must be a DurableObject subclass, got {cls!r}"
            raise InvalidArgumentError(msg)
        # A bad fan-out policy fails here, not at the first broadcast.
        policy_for(cls.__name__, cls.fanout_overflow, cls.fanout_queue_bytes, MIN_QUEUE_BYTES)


def _bindings_dict(value: Mapping[str, type[DurableObject]]) -> dict[str, type[DurableObject]]:
    return dict(value)


def _vars_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    return dict(value)


def _check_fetch(_: object, __: object, fetch: object) -> None:
    if not callable(fetch):
        msg = f"App(fetch=...) must be callable as fetch(request, env), got {fetch!r}"
        raise InvalidArgumentError(msg)


@attrs.frozen
class App:
    """``App(fetch=fetch, bindings={"ROOMS": Room})``; ``python -m wsecho module:app`` serves it."""

    fetch: WorkerFetch = attrs.field(validator=_check_fetch)  # type: ignore[assignment]
    bindings: Mapping[str, type[DurableObject]] = attrs.field(
        factory=dict, converter=_bindings_dict, validator=_check_bindings
    )
    #: Plain values (settings, clients, secrets) that ``env`` carries beside the namespaces.
    vars: Mapping[str, Any] = attrs.field(factory=dict, converter=_vars_dict)

    def __attrs_post_init__(self) -> None:
        both = sorted(set(self.bindings) & set(self.vars))
        if both:
            msg = f"names used both as a binding and a var: {', '.join(both)}"
            raise InvalidArgumentError(msg)
