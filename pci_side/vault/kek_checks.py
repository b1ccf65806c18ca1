"""KEK check values: telling "not the key the vault was sealed with" apart from tampering.

Each KEK version's check value (`envelope.kek_check_value`) is recorded in `kek_checks` when the
version first seals something. `verify_keyring` runs when a vault opens: every version a card
or an unexpired kept release is sealed under must be in the keyring, with the recorded check
value, or the vault refuses to open with a ConfigError naming the version and the file. A vault
from before check values existed gets them here, after one DEK of each version unwraps.

At run time, a row that fails to decrypt is a key error (VaultKeyMismatch) when the key held
for its version has another check value than the recorded one; only a row that fails under the
recorded key is reported as tampered with (VaultIntegrityError).
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Callable

import structlog

from pci_side.vault.envelope import check_unwraps, kek_check_value, open_token
from pci_side.vault.errors import VaultIntegrityError, VaultKeyMismatch, VaultKeyMissing
from pci_side.vault.kek import KeyProvider
from pci_side.vault.store import Store, WrappedDek
from relay.errors import ConfigError
from relay.secrets import Secret

__all__ = ["KeyChecks", "verify_keyring", "wrong_key_message"]

_log = structlog.get_logger("pci_side.vault")


def wrong_key_message(version: int, source: str) -> str:
    """What a ConfigError says when the key under version is not the vault's."""
    return f"the key for version {version} in {source} is not the key the vault was sealed with"


async def verify_keyring(
    store: Store, provider: KeyProvider, source: str, now: dt.datetime
) -> dict[int, str]:
    """Check the keyring against the vault (see the module docstring); the check values.

    source names the keyring in messages, e.g. "RELAY_VAULT_KEK_FILE (/etc/relay/kek)".
    """
    stored = await store.kek_checks()
    in_use = await store.key_versions_in_use(now)
    for version, where in sorted(in_use.items()):
        kek = _held(provider, version, where, source)
        value = kek_check_value(kek)
        if version not in stored:
            await _prove_legacy_key(store, version, kek, source)
            await store.record_kek_check(version, value, now)
            stored = await store.kek_checks()
        if not hmac.compare_digest(stored[version], value):
            raise ConfigError([wrong_key_message(version, source)])
    current = provider.current_version()
    recorded = stored.get(current)
    if recorded is not None and not hmac.compare_digest(recorded, _value(provider, current)):
        raise ConfigError([wrong_key_message(current, source)])
    return stored


def _held(provider: KeyProvider, version: int, where: str, source: str) -> Secret[bytes]:
    try:
        return provider.key(version)
    except VaultKeyMissing:
        problem = f"{source} has no version {version}, which the vault's {where} are sealed under"
        raise ConfigError([f"{problem}: restore it"]) from None


def _value(provider: KeyProvider, version: int) -> str:
    return kek_check_value(provider.key(version))


async def _prove_legacy_key(store: Store, version: int, kek: Secret[bytes], source: str) -> None:
    """A version in use without a check value (an older vault): one of its seals must open."""
    sealed = await store.sealed_under(version)
    try:
        if isinstance(sealed, WrappedDek):
            check_unwraps(sealed, kek)
        elif sealed is not None:
            open_token(sealed, kek)
    except VaultIntegrityError:
        raise ConfigError([wrong_key_message(version, source)]) from None


class KeyChecks:
    """The recorded check values, cached: recorded before a version first seals anything."""

    def __init__(
        self, store: Store, known: dict[int, str], clock: Callable[[], dt.datetime]
    ) -> None:
        """Start from what verify_keyring returned."""
        self._store = store
        self._known = dict(known)
        self._clock = clock

    async def record(self, version: int, kek: Secret[bytes]) -> None:
        """Record kek's check value under version unless recorded; refuse to seal under another key.

        The first value recorded stays (several processes may race here), so it is read back:
        a keyring whose key under this version differs from the vault's raises VaultKeyMismatch.
        """
        if version not in self._known:
            await self._store.record_kek_check(version, kek_check_value(kek), self._clock())
            self._known = await self._store.kek_checks()
        self._refuse_mismatch(version, kek)

    async def explain(self, version: int, kek: Secret[bytes]) -> None:
        """After a seal under version failed to open: VaultKeyMismatch if kek is the wrong key."""
        if version not in self._known:
            self._known = await self._store.kek_checks()
        self._refuse_mismatch(version, kek)

    def _refuse_mismatch(self, version: int, kek: Secret[bytes]) -> None:
        recorded = self._known.get(version)
        if recorded is not None and not hmac.compare_digest(recorded, kek_check_value(kek)):
            _log.error("vault_key_mismatch", key_version=version)
            raise VaultKeyMismatch(
                f"the keyring's key for version {version} is not the key the vault was sealed "
                "with: check RELAY_VAULT_KEK_FILE",
                key_version=str(version),
            )
