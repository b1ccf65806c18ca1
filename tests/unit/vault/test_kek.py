"""The KEK keyring: the file format, its errors, appending versions, and reloads on a miss.

Also the keyring checked against the vault: a version in use that the keyring lacks, or holds
another key for, stops open_vault with a ConfigError; at run time a wrong key is a key error
(VaultKeyMismatch) and only a row that fails under the right key is tampering.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import secrets
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pci_side.vault import CardVault, FileKeyProvider, Keyring, VaultKeyMissing, open_vault
from pci_side.vault.errors import VaultIntegrityError, VaultKeyMismatch
from pci_side.vault.kek import append_version, create_keyring, parse_keyring, read_keyring
from pci_side.vault.vault import open_store
from relay.config import VaultConfig
from relay.errors import ConfigError
from relay.secrets import Secret
from tests.vault_backends import generated_cards, run_sql


def b64(size: int = 32) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


def test_parse_reads_versions_and_skips_comments_and_blank_lines() -> None:
    """Lines are VERSION:BASE64KEY in any order; the highest version is the current one."""
    key = b64()
    keys = parse_keyring(f"# keyring\n\n3:{key}\n  1 : {b64()}  \n# old\n")
    assert ([1, 3], Secret(base64.b64decode(key))) == (sorted(keys), keys[3])
    assert 3 == FileKeyProvider("unused", keys).current_version()


def test_malformed_lines_are_reported_by_number_without_the_key() -> None:
    """Every bad line is named by its number, and no key text appears in the error."""
    good, short = b64(), b64(16)
    text = "\n".join(
        [f"1:{good}", "garbage", "2:not base64!", f"3:{short}", f"1:{good}", f"0:{good}", "x:1"]
    )
    with pytest.raises(ConfigError) as info:
        parse_keyring(text)
    assert [
        "RELAY_VAULT_KEK_FILE line 2: expected VERSION:BASE64KEY",
        "RELAY_VAULT_KEK_FILE line 3: the key must be 32 bytes in base64",
        "RELAY_VAULT_KEK_FILE line 4: the key must be 32 bytes in base64",
        "RELAY_VAULT_KEK_FILE line 5: version 1 appears twice",
        "RELAY_VAULT_KEK_FILE line 6: the version must be 1 to 2147483647",
        "RELAY_VAULT_KEK_FILE line 7: expected VERSION:BASE64KEY",
    ] == info.value.problems
    assert (False, False) == (good in str(info.value), short in str(info.value))


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"], ids=["empty", "comments"])
def test_a_keyring_without_keys_is_refused(text: str) -> None:
    """A file with no key at all is a configuration error."""
    with pytest.raises(ConfigError) as info:
        parse_keyring(text)
    assert ["RELAY_VAULT_KEK_FILE holds no key"] == info.value.problems


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file names the variable and the path, not the path's contents."""
    with pytest.raises(ConfigError) as info:
        read_keyring(tmp_path / "missing")
    assert [f"RELAY_VAULT_KEK_FILE ({tmp_path / 'missing'}) cannot be read"] == info.value.problems


def test_create_then_append_versions(tmp_path: Path) -> None:
    """create_keyring writes version 1, mode 0600; append_version adds 2 then 3, keeping 1."""
    path = tmp_path / "kek"
    create_keyring(path)
    first = read_keyring(path)[1]
    versions = [append_version(path), append_version(path)]
    keys = read_keyring(path)
    assert ([2, 3], [1, 2, 3], first, 0o600) == (
        versions,
        sorted(keys),
        keys[1],
        path.stat().st_mode & 0o777,
    )
    assert [] == [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_create_keyring_never_overwrites(tmp_path: Path) -> None:
    """An existing keyring is left alone: overwriting it would orphan every wrapped DEK."""
    path = tmp_path / "kek"
    create_keyring(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError):
        create_keyring(path)
    assert before == path.read_bytes()


def test_append_refuses_while_another_append_holds_the_temp_file(tmp_path: Path) -> None:
    """The exclusive temp file is the lock: a second writer fails instead of forking versions."""
    path = tmp_path / "kek"
    create_keyring(path)
    (tmp_path / ".kek.tmp").write_text("")
    with pytest.raises(ConfigError, match="another rotate-key may be running"):
        append_version(path)
    assert [1] == sorted(read_keyring(path))


def test_append_to_a_malformed_file_changes_nothing(tmp_path: Path) -> None:
    """append_version validates the file first and leaves a malformed one as it was."""
    path = tmp_path / "kek"
    path.write_text("1:short\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="line 1"):
        append_version(path)
    assert ("1:short\n", False) == (path.read_text(), (tmp_path / ".kek.tmp").exists())


async def test_file_provider_reload_sees_an_appended_version(tmp_path: Path) -> None:
    """reload() re-reads the file; a version unknown before is known after."""
    path = tmp_path / "kek"
    create_keyring(path)
    provider = await FileKeyProvider.load(path)
    append_version(path)
    with pytest.raises(VaultKeyMissing):
        provider.key(2)
    await provider.reload()
    assert (2, (1, 2)) == (provider.current_version(), provider.versions())


def test_provider_repr_names_versions_only(tmp_path: Path) -> None:
    """The provider's repr shows its file and versions, never a key."""
    key = b64()
    provider = FileKeyProvider(tmp_path / "kek", parse_keyring(f"1:{key}\n"))
    assert (False, True) == (key in repr(provider), "versions=[1]" in repr(provider))


class SlowProvider:
    """A KeyProvider whose reload takes a while and reveals keys queued in `upcoming`."""

    def __init__(self) -> None:
        self.keys: dict[int, Secret[bytes]] = {1: Secret(secrets.token_bytes(32))}
        self.upcoming: dict[int, Secret[bytes]] = {}
        self.reloads = 0

    def current_version(self) -> int:
        return max(self.keys)

    def key(self, version: int) -> Secret[bytes]:
        if version not in self.keys:
            raise VaultKeyMissing("unknown", key_version=str(version))
        return self.keys[version]

    async def reload(self) -> None:
        self.reloads += 1
        await asyncio.sleep(0.01)
        self.keys.update(self.upcoming)


async def test_concurrent_misses_share_one_reload() -> None:
    """Twenty lookups of a new version at once trigger one reload, and all get the key."""
    provider = SlowProvider()
    provider.upcoming[2] = Secret(secrets.token_bytes(32))
    keyring = Keyring(provider)
    found = await asyncio.gather(*(keyring.key(2) for _ in range(20)))
    assert ([provider.upcoming[2]] * 20, 1) == (found, provider.reloads)


async def test_misses_reload_at_most_once_per_interval() -> None:
    """A version that stays unknown re-reads the keyring again only after the interval."""
    now = [100.0]
    provider = SlowProvider()
    keyring = Keyring(provider, min_reload_interval=1.0, monotonic=lambda: now[0])
    counts = []
    for step in (0.0, 0.5, 0.6):
        now[0] += step
        with pytest.raises(VaultKeyMissing):
            await keyring.key(9)
        counts.append(provider.reloads)
    assert [1, 1, 2] == counts


async def test_a_malformed_file_during_a_miss_keeps_the_old_keys(tmp_path: Path) -> None:
    """If the file is broken when a miss re-reads it, the keys held so far stay usable."""
    path = tmp_path / "kek"
    create_keyring(path)
    keyring = Keyring(await FileKeyProvider.load(path))
    known = keyring.current()[1]
    path.write_text("broken\n")
    with pytest.raises(VaultKeyMissing):
        await keyring.key(2)
    assert known == await keyring.key(1)


async def test_open_vault_names_the_bad_line_of_the_kek_file(
    sqlite_vault_config: VaultConfig,
) -> None:
    """A malformed KEK file stops open_vault with a ConfigError naming the line."""
    Path(sqlite_vault_config.kek_file).write_text(f"# header\n1:{b64()}\n2:{b64(31)}\n")
    with pytest.raises(ConfigError) as info:
        await open_vault(sqlite_vault_config)
    assert ["RELAY_VAULT_KEK_FILE line 3: the key must be 32 bytes in base64"] == (
        info.value.problems
    )


def test_keyring_file_lines_are_ascii_base64(tmp_path: Path) -> None:
    """The file create_keyring writes is one comment line and VERSION:BASE64 lines."""
    path = tmp_path / "kek"
    create_keyring(path)
    lines = path.read_text().splitlines()
    version, key = lines[1].split(":")
    assert (True, "1", 32) == (lines[0].startswith("#"), version, len(base64.b64decode(key)))
    assert 0 == path.stat().st_mode & 0o077


# --- The keyring checked against the vault ---------------------------------------------------


def write_keyring(config: VaultConfig, lines: dict[int, bytes]) -> None:
    """Replace the vault's keyring file with these versions (mode 0600)."""
    path = Path(config.kek_file)
    path.write_text("".join(f"{v}:{base64.b64encode(k).decode()}\n" for v, k in lines.items()))
    path.chmod(0o600)


async def seeded(config: VaultConfig) -> str:
    """Import one card under version 1 with the config's keyring; its card_ref."""
    card = generated_cards(1, merchants=("m1",))[0]
    async with await open_vault(config) as vault:
        await vault.import_cards([card])
    return card.card_ref


def check_value(key: bytes) -> str:
    return hmac.new(key, b"relay kek check value v1", hashlib.sha256).hexdigest()


async def test_a_keyring_missing_a_version_in_use_stops_open_vault(
    vault_config: VaultConfig,
) -> None:
    """Cards sealed under version 1 and a keyring holding only 2: ConfigError naming both."""
    await seeded(vault_config)
    write_keyring(vault_config, {2: secrets.token_bytes(32)})
    with pytest.raises(ConfigError) as info:
        await open_vault(vault_config)
    expected = (
        f"RELAY_VAULT_KEK_FILE ({vault_config.kek_file}) has no version 1, which the vault's "
        "cards are sealed under: restore it"
    )
    assert [expected] == info.value.problems


async def test_a_wrong_key_under_the_right_version_is_a_key_error_not_tampering(
    vault_config: VaultConfig,
) -> None:
    """Another key under version 1: the wrong-key ConfigError, which never says tampering."""
    await seeded(vault_config)
    write_keyring(vault_config, {1: secrets.token_bytes(32)})
    with pytest.raises(ConfigError) as info:
        await open_vault(vault_config)
    expected = (
        f"the key for version 1 in RELAY_VAULT_KEK_FILE ({vault_config.kek_file}) is not the key "
        "the vault was sealed with"
    )
    assert [expected] == info.value.problems


async def test_the_check_value_is_recorded_when_a_version_first_seals(
    vault_config: VaultConfig,
) -> None:
    """Importing under version 1 records HMAC-SHA256(kek, label) for it, and nothing else."""
    await seeded(vault_config)
    key = read_keyring(vault_config.kek_file)[1].get_secret_value()
    rows = run_sql(vault_config, "SELECT version, check_value FROM kek_checks")
    assert [(1, check_value(key))] == rows


async def test_a_vault_without_check_values_gets_them_on_open(vault_config: VaultConfig) -> None:
    """A vault from before check values: open_vault unwraps a DEK, then records the value."""
    await seeded(vault_config)
    run_sql(vault_config, "DELETE FROM kek_checks")
    async with await open_vault(vault_config):
        pass
    key = read_keyring(vault_config.kek_file)[1].get_secret_value()
    assert [(1, check_value(key))] == run_sql(
        vault_config, "SELECT version, check_value FROM kek_checks"
    )


async def test_a_vault_without_check_values_still_refuses_a_wrong_key(
    vault_config: VaultConfig,
) -> None:
    """Without a stored check value, a key that cannot unwrap the DEK is the wrong-key error."""
    await seeded(vault_config)
    run_sql(vault_config, "DELETE FROM kek_checks")
    write_keyring(vault_config, {1: secrets.token_bytes(32)})
    with pytest.raises(ConfigError, match="is not the key the vault was sealed with"):
        await open_vault(vault_config)
    assert [] == run_sql(vault_config, "SELECT version FROM kek_checks")


async def test_rotation_records_the_new_version(vault_config: VaultConfig) -> None:
    """rotate-key to an appended version 2 records its check value beside version 1's."""
    await seeded(vault_config)
    append_version(vault_config.kek_file)
    async with await open_vault(vault_config) as vault:
        await vault.rotate_key()
    keys = read_keyring(vault_config.kek_file)
    expected = [(v, check_value(keys[v].get_secret_value())) for v in (1, 2)]
    assert expected == run_sql(
        vault_config, "SELECT version, check_value FROM kek_checks ORDER BY version"
    )


async def vault_with_keys(config: VaultConfig, keys: dict[int, Secret[bytes]]) -> CardVault:
    """A vault past open_vault's check (the seam a running worker is in after a reload)."""
    store = await open_store(config)
    provider = FileKeyProvider(config.kek_file, keys)
    return CardVault(store, provider, config.fingerprint_key, config.audit_key)


async def test_at_run_time_a_swapped_key_is_a_key_error(vault_config: VaultConfig) -> None:
    """load_card with another key under the row's version: VaultKeyMismatch, logged as such."""
    card_ref = await seeded(vault_config)
    swapped = {1: Secret(secrets.token_bytes(32))}
    async with await vault_with_keys(vault_config, swapped) as vault:
        with capture_logs() as logs, pytest.raises(VaultKeyMismatch) as info:
            await vault.load_card(card_ref, "m1")
    events = [(log["event"], log.get("key_version")) for log in logs]
    assert ([("vault_key_mismatch", 1)], {"key_version": "1"}) == (events, info.value.ids)
    assert "tamper" not in str(info.value)


async def test_at_run_time_a_tampered_row_under_the_right_key_is_still_integrity(
    vault_config: VaultConfig,
) -> None:
    """A flipped ciphertext byte under the recorded key stays VaultIntegrityError."""
    card_ref = await seeded(vault_config)
    [(ciphertext,)] = run_sql(vault_config, "SELECT ciphertext FROM cards")
    broken = bytes(ciphertext[:-1]) + bytes([ciphertext[-1] ^ 1])
    run_sql(vault_config, "UPDATE cards SET ciphertext = ?", [broken])
    async with await open_vault(vault_config) as vault:
        with capture_logs() as logs, pytest.raises(VaultIntegrityError):
            await vault.load_card(card_ref, "m1")
    assert ["vault_integrity_failure"] == [log["event"] for log in logs]


async def test_sealing_under_a_version_recorded_with_another_key_is_refused(
    vault_config: VaultConfig,
) -> None:
    """An import under a version whose recorded check value is another key's seals nothing."""
    await seeded(vault_config)
    other = {1: Secret(secrets.token_bytes(32))}
    async with await vault_with_keys(vault_config, other) as vault:
        with pytest.raises(VaultKeyMismatch):
            await vault.import_cards(generated_cards(1, start=7))
    assert [(1,)] == run_sql(vault_config, "SELECT count(*) FROM cards")


async def test_open_vault_refuses_a_kek_file_others_may_read(vault_config: VaultConfig) -> None:
    """A 0644 keyring is refused by open_vault, naming the file and saying chmod 600."""
    Path(vault_config.kek_file).chmod(0o644)
    with pytest.raises(ConfigError) as info:
        await open_vault(vault_config)
    path = vault_config.kek_file
    expected = (
        f"RELAY_VAULT_KEK_FILE ({path}) may be read or written by other users (mode 0644): "
        f"chmod 600 {path}"
    )
    assert [expected] == info.value.problems


async def test_open_vault_takes_a_group_readable_kek_file_of_the_secret_files_group(
    sqlite_vault_config: VaultConfig,
) -> None:
    """A 0640 keyring opens when secret_files_group is the file's group."""
    path = Path(sqlite_vault_config.kek_file)
    path.chmod(0o640)
    config = dataclasses.replace(sqlite_vault_config, secret_files_group=path.stat().st_gid)
    async with await open_vault(config) as vault:
        assert 1 == vault.key_version
