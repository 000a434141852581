"""An object's identity: ``DurableObjectId``."""

from __future__ import annotations

import attrs


@attrs.frozen(repr=False)
class DurableObjectId:
    """An object's identity within its namespace: 64 lowercase hex digits."""

    namespace: str
    hex: str
    #: The name given to ``id_from_name``; None for unique and parsed ids.
    name: str | None = attrs.field(default=None, eq=False)

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        label = f" name={self.name!r}" if self.name is not None else ""
        return f"<DurableObjectId {self.namespace}:{self.hex[:12]}…{label}>"

    def to_string(self) -> str:
        return self.hex
