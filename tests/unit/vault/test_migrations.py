"""Opening a vault applies migrations once, also when several processes open it at once."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from pci_side.vault import CardVault, VaultUnavailable, open_vault
from pci_side.vault.migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from relay.config import VaultConfig
from relay.errors import ConfigError
from relay.secrets import Secret
from tests.vault_backends import generated_cards, make_vault_config, run_sql


def applied_versions(config: VaultConfig) -> list[tuple[int]]:
    """What schema_version should hold once every migration of config's backend has run."""
    migrations = SQLITE_MIGRATIONS if config.backend == "sqlite" else POSTGRES_MIGRATIONS
    return [(version,) for version, _ in migrations]


async def test_reopening_keeps_the_cards_and_the_schema_version(vault_config: VaultConfig) -> None:
    """A second open finds the schema applied and the cards there."""
    async with await open_vault(vault_config) as vault:
        await vault.import_cards(generated_cards(3))
    async with await open_vault(vault_config) as vault:
        count = await vault.count_cards()
    versions = run_sql(vault_config, "SELECT version FROM schema_version ORDER BY version")
    assert (3, applied_versions(vault_config)) == (count, versions)


async def test_concurrent_opens_of_a_fresh_vault_migrate_once(vault_config: VaultConfig) -> None:
    """Four vaults opened at once on an empty database all work; each version is applied once."""
    vaults: list[CardVault] = list(
        await asyncio.gather(*(open_vault(vault_config) for _ in range(4)))
    )
    try:
        await vaults[0].import_cards(generated_cards(2))
        counts = [await vault.count_cards() for vault in vaults]
    finally:
        for vault in vaults:
            await vault.close()
    assert ([2, 2, 2, 2], applied_versions(vault_config)) == (
        counts,
        run_sql(vault_config, "SELECT version FROM schema_version ORDER BY version"),
    )


async def test_a_schema_newer_than_the_code_is_refused(vault_config: VaultConfig) -> None:
    """A vault migrated by a newer relay is not opened by an older one."""
    async with await open_vault(vault_config):
        pass
    run_sql(
        vault_config,
        "INSERT INTO schema_version (version, applied_at) VALUES (99, ?)",
        ["2030-01-01T00:00:00Z"],
    )
    with pytest.raises(ConfigError, match="newer than this relay"):
        await open_vault(vault_config)


async def test_a_short_fingerprint_key_is_refused(sqlite_vault_config: VaultConfig) -> None:
    """open_vault refuses a fingerprint key under 32 bytes, naming the variable."""
    config = dataclasses.replace(sqlite_vault_config, fingerprint_key=Secret(b"short"))
    with pytest.raises(ConfigError) as info:
        await open_vault(config)
    assert ["RELAY_VAULT_FINGERPRINT_KEY_FILE must hold at least 32 bytes"] == info.value.problems


async def test_a_short_audit_key_is_refused(sqlite_vault_config: VaultConfig) -> None:
    """open_vault refuses an audit key under 32 bytes, naming the variable."""
    config = dataclasses.replace(sqlite_vault_config, audit_key=Secret(b"k" * 31))
    with pytest.raises(ConfigError) as info:
        await open_vault(config)
    assert ["RELAY_VAULT_AUDIT_KEY_FILE must hold at least 32 bytes"] == info.value.problems


async def test_a_new_sqlite_vault_file_is_owner_only(sqlite_vault_config: VaultConfig) -> None:
    """The SQLite file and its WAL are created mode 0600: they hold ciphertext and fingerprints."""
    async with await open_vault(sqlite_vault_config) as vault:
        await vault.import_cards(generated_cards(1))
        path = Path(sqlite_vault_config.url.get_secret_value().removeprefix("sqlite:///"))
        modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.glob("vault.db*")}
    assert {"vault.db": 0o600, "vault.db-wal": 0o600, "vault.db-shm": 0o600} == modes


async def test_an_unopenable_sqlite_path_is_a_config_error(tmp_path: Path) -> None:
    """A SQLite URL in a directory that does not exist names RELAY_VAULT_URL."""
    config = make_vault_config(f"sqlite:///{tmp_path / 'missing' / 'vault.db'}", tmp_path)
    with pytest.raises(ConfigError) as info:
        await open_vault(config)
    assert ["RELAY_VAULT_URL names a SQLite file that cannot be opened"] == info.value.problems


async def test_an_unreachable_postgres_server_is_unavailable(tmp_path: Path) -> None:
    """A PostgreSQL URL nobody answers on raises VaultUnavailable, not a driver error."""
    config = make_vault_config(
        "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", tmp_path, pool_size=1
    )
    with pytest.raises(VaultUnavailable) as info:
        await open_vault(config, open_timeout=0.3)
    assert "vault database unreachable: check RELAY_VAULT_URL" == str(info.value)
