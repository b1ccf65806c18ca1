"""Secret[T]: a value (a key, a shared secret) that is masked by construction.

Every rendering (repr, str, format, JSON through structlog) prints a fixed mask, and pickling is
refused, so a key cannot leak through a dataclass repr or a log line (STYLE leak 7).
`read_secret_file` is how every secret or key file is read: only if no one else may read it.
"""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path
from typing import Generic, NoReturn, TypeVar

from relay.errors import ConfigError

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


SECRET_FILES_GROUP_VARIABLE = "RELAY_SECRET_FILES_GROUP"  # noqa: S105 - a variable name
_GROUP_READ = stat.S_IRGRP
_PRIVATE_MODE = 0o077


def read_secret_file(
    path: str | os.PathLike[str], setting: str, *, group: int | None = None
) -> bytes:
    """The bytes of a secret or key file, refused (ConfigError) if others may read or write it.

    A file whose mode has any group or other bit (`mode & 0o077`) is refused with a message that
    names the setting and the path and says `chmod 600 <path>`: a key any local user can read is
    not a secret. One exception is made for Kubernetes secret volumes, where kubelet makes each
    file root-owned with the pod's fsGroup as its group and mode 0440: when `group` (the value
    of RELAY_SECRET_FILES_GROUP, see `secret_files_group`) is that file's group, the group may
    read it, but never write it, and "other" may do nothing. The mode is checked on the open
    file itself, so the file cannot be swapped between the check and the read.
    """
    try:
        with Path(path).open("rb") as handle:
            check_secret_mode(os.fstat(handle.fileno()), path, setting, group=group)
            return handle.read()
    except OSError:
        raise ConfigError([f"{setting} ({path}) cannot be read"]) from None


def check_secret_file(
    path: str | os.PathLike[str], setting: str, *, group: int | None = None
) -> None:
    """Apply read_secret_file's mode rule to a file another component reads later (a TLS key)."""
    try:
        status = Path(path).stat()
    except OSError:
        raise ConfigError([f"{setting} ({path}) cannot be read"]) from None
    check_secret_mode(status, path, setting, group=group)


def check_secret_mode(
    status: os.stat_result, path: str | os.PathLike[str], setting: str, *, group: int | None
) -> None:
    """Raise ConfigError unless status is private (see read_secret_file for the rule)."""
    loose = status.st_mode & _PRIVATE_MODE
    if group is not None and status.st_gid == group:
        loose &= ~_GROUP_READ
    if loose:
        mode = stat.S_IMODE(status.st_mode)
        problem = f"{setting} ({path}) may be read or written by other users (mode {mode:04o})"
        raise ConfigError([f"{problem}: chmod 600 {path}"])


def secret_files_group(value: str | None) -> int | None:
    """The gid RELAY_SECRET_FILES_GROUP names (None when unset); ConfigError if it is no gid."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise ConfigError([f"{SECRET_FILES_GROUP_VARIABLE} must be a numeric group id"])
    return int(text)
