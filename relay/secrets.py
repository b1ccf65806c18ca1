"""Secret[T]: a value (a key, a shared secret) that is masked by construction.

Every rendering (repr, str, format, JSON through structlog) prints a fixed mask, and pickling is
refused, so a key cannot leak through a dataclass repr or a log line (STYLE leak 7).
"""

from __future__ import annotations

import hmac
from typing import Generic, NoReturn, TypeVar

T = TypeVar("T")

MASK = "**********"


class Masked:
    """Base of values whose every rendering is their (masked) repr and that refuse pickling.

    Subclasses define __repr__; str, format, structlog's JSONRenderer and pickle, copy and
    dataclasses.asdict (which go through __reduce__) are all covered here, once.
    """

    __slots__ = ()

    def __str__(self) -> str:
        """Render the masked repr."""
        return repr(self)

    def __format__(self, spec: str) -> str:
        """Render the masked repr whatever the format spec."""
        return repr(self)

    def __structlog__(self) -> str:
        """Render the masked repr in structlog's JSONRenderer."""
        return repr(self)

    def __reduce__(self) -> NoReturn:
        """Refuse pickling, and with it copy, deepcopy and dataclasses.asdict."""
        raise TypeError(f"{type(self).__name__} is not serializable")


class Secret(Masked, Generic[T]):
    """Holds a secret value; only get_secret_value() returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        """Wrap the value."""
        self._value = value

    def get_secret_value(self) -> T:
        """Return the wrapped value. Call it where the secret is used, never to log it."""
        return self._value

    def __repr__(self) -> str:
        """Render the mask."""
        return f"Secret({MASK})"

    def __eq__(self, other: object) -> bool:
        """Compare in constant time where the values are bytes or str."""
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = self._value, other._value
        if isinstance(mine, str) and isinstance(theirs, str):
            return hmac.compare_digest(mine.encode(), theirs.encode())
        if isinstance(mine, bytes) and isinstance(theirs, bytes):
            return hmac.compare_digest(mine, theirs)
        return bool(mine == theirs)

    def __hash__(self) -> int:
        """Secrets are not meant as dict keys; hash by identity."""
        return id(self)
