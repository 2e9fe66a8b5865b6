"""Named building blocks (losses, trainers) that recipes select by name and users extend."""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered; catchable as either ``ValueError`` or ``KeyError``."""

    # KeyError.__str__ would repr() the message and show it quoted.
    __str__ = Exception.__str__


class Registry(dict):
    """A dict of named objects whose `register` refuses silent replacement and whose `lookup`
    names the nearest registered name when asked for one that does not exist."""

    def __init__(self, kind: str, error: type[Exception] = UnknownNameError):
        super().__init__()
        self.kind, self.error = kind, error

    def register(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        """Decorator adding the object under `name`; a typo in a plugin can't replace a built-in."""

        def decorator(obj: T) -> T:
            if name in self and not override:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass override=True to replace it")
            self[name] = obj
            return obj

        return decorator

    def lookup(self, name: str):
        try:
            return self[name]
        except (KeyError, TypeError):
            nearest = difflib.get_close_matches(str(name), list(self), n=1, cutoff=0.0)
            hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
            raise self.error(f"Unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self))}") from None
