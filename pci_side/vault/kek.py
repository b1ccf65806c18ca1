"""The keyring of key-encryption keys (KEKs): versioned AES-256 keys that wrap each card's DEK.

The production provider reads `RELAY_VAULT_KEK_FILE`: one key per line as `VERSION:BASE64KEY`
(32 bytes), blank lines and `#` comments allowed; the highest version is current. A KMS plugs
in by implementing `KeyProvider`. `Keyring` wraps any provider with the one behaviour a running
worker needs: when a row names a version it does not know (another process ran
`relay cards rotate-key` after a new version was appended to the file), it re-reads the keyring
once, single flight and at most once per interval, so the worker keeps serving through a
rotation and a row with a bogus version cannot make it re-read the file on every request.

Keys are only ever held in `Secret`; errors name the variable and line number, never a key.
The file is read through `read_secret_file`, so one that other users may read is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

import structlog

from pci_side.vault.errors import VaultKeyMissing
from relay.errors import ConfigError
from relay.secrets import Secret, read_secret_file

__all__ = [
    "KEK_FILE_VARIABLE",
    "FileKeyProvider",
    "KeyProvider",
    "Keyring",
    "append_version",
    "create_keyring",
    "parse_keyring",
]

KEK_FILE_VARIABLE: Final = "RELAY_VAULT_KEK_FILE"
KEY_BYTES: Final = 32
MAX_VERSION: Final = 2**31 - 1  # stored in an INTEGER column on both backends
_HEADER: Final = (
    "# Relay vault KEKs, VERSION:BASE64KEY (32 bytes); the highest version is current\n"
)
_log = structlog.get_logger("pci_side.vault")


class KeyProvider(Protocol):
    """Where KEKs come from: a file here, a KMS elsewhere."""

    def current_version(self) -> int:
        """The version new DEKs are wrapped under."""
        ...

    def key(self, version: int) -> Secret[bytes]:
        """The 32-byte KEK of a version; raises VaultKeyMissing if it is not held."""
        ...

    async def reload(self) -> None:
        """Fetch the keyring again; on failure keep the keys held so far and raise."""
        ...


def parse_keyring(text: str) -> dict[int, Secret[bytes]]:
    """Parse keyring text, collecting every malformed line into one ConfigError."""
    keys: dict[int, Secret[bytes]] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            problem = _parse_line(line, keys)
            if problem:
                problems.append(f"{KEK_FILE_VARIABLE} line {number}: {problem}")
    if not keys and not problems:
        problems.append(f"{KEK_FILE_VARIABLE} holds no key")
    if problems:
        raise ConfigError(problems)
    return keys


def _parse_line(line: str, keys: dict[int, Secret[bytes]]) -> str | None:
    version_text, colon, key_text = (part.strip() for part in line.partition(":"))
    if not (colon and version_text.isascii() and version_text.isdigit()):
        return "expected VERSION:BASE64KEY"
    version = int(version_text)
    if not 1 <= version <= MAX_VERSION:
        return f"the version must be 1 to {MAX_VERSION}"
    try:
        key = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        return f"the key must be {KEY_BYTES} bytes in base64"
    if version in keys:
        return f"version {version} appears twice"
    keys[version] = Secret(key)
    return None


def read_keyring(
    path: str | os.PathLike[str], *, group: int | None = None
) -> dict[int, Secret[bytes]]:
    """Read and parse a keyring file (group: RELAY_SECRET_FILES_GROUP, see read_secret_file)."""
    return parse_keyring(_read_text(Path(path), group))


def _read_text(path: Path, group: int | None = None) -> str:
    data = read_secret_file(path, KEK_FILE_VARIABLE, group=group)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError([f"{KEK_FILE_VARIABLE} cannot be read as ASCII text"]) from None


class FileKeyProvider:
    """The keyring in RELAY_VAULT_KEK_FILE."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        keys: dict[int, Secret[bytes]],
        *,
        group: int | None = None,
    ) -> None:
        """Hold already-parsed keys; use `load` to read them."""
        self._path = Path(path)
        self._keys = dict(keys)
        self._group = group

    @classmethod
    async def load(
        cls, path: str | os.PathLike[str], *, group: int | None = None
    ) -> FileKeyProvider:
        """Read the file off the event loop and parse it; group may read it (Kubernetes)."""
        keys = await asyncio.to_thread(read_keyring, path, group=group)
        return cls(path, keys, group=group)

    @property
    def path(self) -> Path:
        """The keyring file (named in errors; not secret)."""
        return self._path

    def current_version(self) -> int:
        """The highest version in the file."""
        return max(self._keys)

    def versions(self) -> tuple[int, ...]:
        """The versions held, ascending (not secret)."""
        return tuple(sorted(self._keys))

    def key(self, version: int) -> Secret[bytes]:
        """The KEK of a version, or VaultKeyMissing."""
        try:
            return self._keys[version]
        except KeyError:
            raise VaultKeyMissing(
                f"KEK version {version} is not in the keyring: check {KEK_FILE_VARIABLE}",
                key_version=str(version),
            ) from None

    async def reload(self) -> None:
        """Re-read the file; a malformed file raises ConfigError and the old keys stay."""
        self._keys = await asyncio.to_thread(read_keyring, self._path, group=self._group)

    def __repr__(self) -> str:
        """Name the file and versions, never a key."""
        return f"FileKeyProvider({str(self._path)!r}, versions={list(self.versions())})"


class Keyring:
    """A KeyProvider plus single-flight, rate-limited reloads when a version is unknown."""

    def __init__(
        self,
        provider: KeyProvider,
        *,
        min_reload_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wrap a provider; a miss re-reads it at most once per min_reload_interval seconds."""
        self.provider = provider
        self._interval = min_reload_interval
        self._monotonic = monotonic
        self._last_miss_reload = -math.inf
        self._lock = asyncio.Lock()

    def current(self) -> tuple[int, Secret[bytes]]:
        """The current version and its key."""
        version = self.provider.current_version()
        return version, self.provider.key(version)

    async def key(self, version: int) -> Secret[bytes]:
        """The KEK of a version, reloading the provider once if it is unknown."""
        with contextlib.suppress(VaultKeyMissing):
            return self.provider.key(version)
        async with self._lock:
            # Whoever held the lock before may have reloaded already: that is the single flight.
            with contextlib.suppress(VaultKeyMissing):
                return self.provider.key(version)
            await self._reload_after_miss(version)
            return self.provider.key(version)

    async def reload(self) -> None:
        """Reload unconditionally (rotate-key does, to use the newest version); errors raise."""
        async with self._lock:
            await self.provider.reload()

    async def _reload_after_miss(self, version: int) -> None:
        now = self._monotonic()
        if now - self._last_miss_reload < self._interval:
            return
        self._last_miss_reload = now
        try:
            await self.provider.reload()
        except ConfigError as exc:
            _log.error("vault_keyring_reload_failed", problems=exc.problems)
            return
        _log.info(
            "vault_keyring_reloaded",
            wanted_version=version,
            current_version=self.provider.current_version(),
        )


def create_keyring(path: str | os.PathLike[str]) -> None:
    """Write a new keyring file holding one fresh version 1 (mode 0600); never overwrite one."""
    target = Path(path)

    def content(existing: str | None) -> str:
        if existing is not None:
            raise ConfigError([f"{KEK_FILE_VARIABLE}: the keyring file exists already"])
        return _HEADER + _new_line(1)

    _rewrite(target, content)


def append_version(path: str | os.PathLike[str]) -> int:
    """Append a freshly generated key as the next version, atomically; return that version.

    For `relay cards rotate-key --generate`. Running processes pick the new version up when
    they first meet a row wrapped under it; rotate-key then re-wraps every DEK under it.
    """
    target = Path(path)
    added: list[int] = []

    def content(existing: str | None) -> str:
        if existing is None:
            raise ConfigError([f"{KEK_FILE_VARIABLE} cannot be read as ASCII text"])
        version = max(parse_keyring(existing)) + 1
        if version > MAX_VERSION:
            raise ConfigError([f"{KEK_FILE_VARIABLE}: no version is left after {MAX_VERSION}"])
        added.append(version)
        body = existing if existing.endswith("\n") or not existing else existing + "\n"
        return body + _new_line(version)

    _rewrite(target, content)
    return added[0]


def _new_line(version: int) -> str:
    return f"{version}:{base64.b64encode(os.urandom(KEY_BYTES)).decode('ascii')}\n"


def _rewrite(target: Path, content: Callable[[str | None], str]) -> None:
    """Replace target with content(old text) through a 0600 temp file and os.replace.

    The temp file is created exclusively *before* the old text is read, so it doubles as a
    lock: two concurrent appenders cannot both write the same next version.
    """
    temp = target.with_name(f".{target.name}.tmp")
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            [f"{KEK_FILE_VARIABLE}: {temp.name} exists; another rotate-key may be running"]
        ) from None
    except OSError:
        raise ConfigError([f"{KEK_FILE_VARIABLE}: its directory is not writable"]) from None
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(content(_read_text(target) if target.exists() else None))
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory, which is fine."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
