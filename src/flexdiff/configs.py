"""The one convention for settings: a frozen dataclass, checked when it is made, with a dict form.

Subclasses put their checks in `check()`; `__post_init__` calls it, so no config exists with bad
values (and `dataclasses.replace` checks again). `to_dict` is what runs store as their identity;
`from_dict` refuses unknown fields by name and turns JSON lists back into tuples.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from .errors import FlexdiffError


class Config:
    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a FlexdiffError naming the option when a value is out of range (none by default)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "settings"):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FlexdiffError(f"{where}: unknown field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
