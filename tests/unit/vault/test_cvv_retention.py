"""The CVV retention policy, on both backends: delete after use, keep, and the max-age sweep.

PCI DSS v4.0 3.3.1.2 and 3.3.3: a security code is kept only with a documented business need,
and never past its use. Each test reads the row back as the vault and as the database hold it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from pci_side.vault import CardVault, CvvRetention, NewCard, append_version, open_vault
from relay.cards import CardData, Pan, SecurityCode
from relay.config import VaultConfig, VaultSettings
from relay.errors import ConfigError
from tests.cards_testdata import TEST_CARDS
from tests.vault_backends import run_sql, vault_env

MERCHANT = "m1"
HOUR = 3600
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += dt.timedelta(seconds=seconds)


def card(index: int, code: str | None = "123") -> NewCard:
    vector = TEST_CARDS[index]
    data = CardData(Pan(vector.digits), 7, 2031, SecurityCode(code) if code else None, "001")
    return NewCard(f"card-{index}", data, (MERCHANT,))


def with_policy(config: VaultConfig, policy: str, max_age: int = 86_400) -> VaultConfig:
    return dataclasses.replace(config, cvv_policy=policy, cvv_max_age=max_age)


def stored_flags(config: VaultConfig) -> dict[str, bool]:
    """has_security_code per card_ref, as the database holds it."""
    rows = run_sql(config, "SELECT card_ref, has_security_code FROM cards")
    return {ref: bool(flag) for ref, flag in rows}


# --- delete-after-use and keep ------------------------------------------------------------------


async def test_delete_after_use_reseals_the_card_without_its_cvv(vault_config: VaultConfig):
    """After security_code_used the card loads without a CVV; PAN, expiry and type unchanged."""
    async with await open_vault(with_policy(vault_config, "delete-after-use")) as vault:
        await vault.import_cards([card(0), card(1)])
        before = run_sql(vault_config, "SELECT ciphertext FROM cards WHERE card_ref = 'card-0'")
        await vault.security_code_used("card-0")
        loaded = await vault.load_card("card-0", MERCHANT)
        untouched = await vault.load_card("card-1", MERCHANT)
        [summary] = await vault.list_cards(limit=1)
    expected = card(0).card
    assert (expected.pan, 7, 2031, "001", None) == (
        loaded.pan,
        loaded.expiration_month,
        loaded.expiration_year,
        loaded.card_type,
        loaded.security_code,
    )
    assert {"card-0": False, "card-1": True} == stored_flags(vault_config)
    assert ("card-0", False) == (summary.card_ref, summary.has_security_code)
    assert SecurityCode("123") == untouched.security_code
    after = run_sql(vault_config, "SELECT ciphertext FROM cards WHERE card_ref = 'card-0'")
    assert before != after


async def test_keep_leaves_the_cvv_in_place(vault_config: VaultConfig):
    """Under keep, security_code_used changes nothing: the card still loads with its CVV."""
    async with await open_vault(with_policy(vault_config, "keep")) as vault:
        await vault.import_cards([card(0)])
        await vault.security_code_used("card-0")
        loaded = await vault.load_card("card-0", MERCHANT)
    assert SecurityCode("123") == loaded.security_code
    assert {"card-0": True} == stored_flags(vault_config)


async def test_a_card_without_cvv_or_unknown_is_left_alone(vault: CardVault, vault_config):
    """No CVV to delete, or no such card: nothing is written and nothing raises."""
    await vault.import_cards([card(2, code=None)])
    before = run_sql(vault_config, "SELECT ciphertext, updated_at FROM cards")
    await vault.security_code_used("card-2")
    await vault.security_code_used("card-never-stored")
    assert before == run_sql(vault_config, "SELECT ciphertext, updated_at FROM cards")


async def test_two_deletions_at_once_both_end_well(vault: CardVault):
    """Concurrent deletions of one CVV: one wins the compare-and-set, the card still opens."""
    await vault.import_cards([card(0)])
    await asyncio.gather(*(vault.security_code_used("card-0") for _ in range(4)))
    loaded = await vault.load_card("card-0", MERCHANT)
    assert (card(0).card.pan, None) == (loaded.pan, loaded.security_code)


async def test_deletion_by_a_worker_with_an_old_keyring_keeps_the_rotated_key(vault_config):
    """A worker that knows only KEK 1 deletes a CVV after a rotation to 2: the row stays on 2.

    The record is re-sealed under its own DEK, so a rotation (which re-wraps that DEK) and a
    deletion commute; re-sealing under the worker's stale current version would undo the
    rotation, and the card would be lost once version 1 is retired.
    """
    async with await open_vault(vault_config) as worker:
        await worker.import_cards([card(0)])
        append_version(vault_config.kek_file)
        async with await open_vault(vault_config) as cli:
            await cli.rotate_key()
        await worker.security_code_used("card-0")
        loaded = await worker.load_card("card-0", MERCHANT)
    rows = run_sql(vault_config, "SELECT key_version, has_security_code FROM cards")
    assert [(2, False)] == [(version, bool(flag)) for version, flag in rows]
    assert (card(0).card.pan, None) == (loaded.pan, loaded.security_code)


async def test_a_failed_deletion_is_logged_and_does_not_raise(
    vault: CardVault, vault_config: VaultConfig, log_stream
):
    """A row that fails its integrity check: vault_cvv_delete_failed, with no card data."""
    await vault.import_cards([card(0)])
    run_sql(vault_config, "UPDATE cards SET exp_month = 8 WHERE card_ref = 'card-0'")
    await vault.security_code_used("card-0")
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    [failed] = [event for event in events if event["event"] == "vault_cvv_delete_failed"]
    assert ("card-0", "VaultIntegrityError") == (failed["card_ref"], failed["error"])
    assert "123" not in json.dumps(failed)
    assert {"card-0": True} == stored_flags(vault_config)


# --- the max-age sweep ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["delete-after-use", "keep"])
async def test_purge_deletes_only_cvvs_older_than_the_max_age(vault_config, policy: str):
    """Under either policy, a CVV goes once its card was stored max_age ago, and not before."""
    clock = Clock(T0)
    config = with_policy(vault_config, policy, max_age=HOUR)
    async with await open_vault(config, clock=clock) as vault:
        await vault.import_cards([card(0)])
        clock.advance(HOUR // 2)
        await vault.import_cards([card(1), card(2, code=None)])
        early = await vault.purge_expired_security_codes(T0 + dt.timedelta(seconds=HOUR - 1))
        at_age = await vault.purge_expired_security_codes(T0 + dt.timedelta(seconds=HOUR))
        flags_at_age = stored_flags(vault_config)
        later = await vault.purge_expired_security_codes(T0 + dt.timedelta(seconds=2 * HOUR))
        codes = [(await vault.load_card(f"card-{i}", MERCHANT)).security_code for i in range(3)]
    assert (0, 1, 1) == (early, at_age, later)
    assert {"card-0": False, "card-1": True, "card-2": False} == flags_at_age
    assert [None, None, None] == codes


async def test_purge_pages_through_every_card(vault_config: VaultConfig):
    """Batches by card_ref reach every expired CVV, however small the batch."""
    clock = Clock(T0)
    async with await open_vault(with_policy(vault_config, "keep", HOUR), clock=clock) as vault:
        await vault.import_cards([card(i) for i in range(5)])
        clock.advance(HOUR)
        purged = await vault.purge_expired_security_codes(batch_size=2)
    assert 5 == purged
    assert not any(stored_flags(vault_config).values())


# --- settings ------------------------------------------------------------------------------------


def test_settings_default_to_delete_after_use_and_one_day(sqlite_vault_config, tmp_path: Path):
    """Unset, the policy is delete-after-use with a max age of 86400 s; the vault gets both."""
    vault = VaultSettings.from_env(vault_env(sqlite_vault_config, tmp_path)).vault
    assert ("delete-after-use", 86_400) == (vault.cvv_policy, vault.cvv_max_age)
    retention = CvvRetention.of(vault)
    assert ("delete-after-use, max age 86400 s", 300) == (
        retention.describe(),
        retention.sweep_interval,
    )


def test_settings_are_read_from_the_environment(sqlite_vault_config, tmp_path: Path):
    """RELAY_VAULT_CVV_POLICY and RELAY_VAULT_CVV_MAX_AGE reach the config and the vault."""
    env = vault_env(sqlite_vault_config, tmp_path) | {
        "RELAY_VAULT_CVV_POLICY": "keep",
        "RELAY_VAULT_CVV_MAX_AGE": "600",
    }
    vault = VaultSettings.from_env(env).vault
    assert ("keep", 600, 150) == (
        vault.cvv_policy,
        vault.cvv_max_age,
        CvvRetention.of(vault).sweep_interval,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_VAULT_CVV_POLICY", "forever"),
        ("RELAY_VAULT_CVV_MAX_AGE", "0"),
        ("RELAY_VAULT_CVV_MAX_AGE", "1.5"),
        ("RELAY_VAULT_CVV_MAX_AGE", "-60"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(sqlite_vault_config, tmp_path, name, value):
    """A value outside the allowed set is a ConfigError that names the setting, not the value."""
    env = vault_env(sqlite_vault_config, tmp_path) | {name: value}
    with pytest.raises(ConfigError) as info:
        VaultSettings.from_env(env)
    assert [name] == [problem.split()[0] for problem in info.value.problems]


async def test_open_vault_hands_the_policy_to_the_vault(vault_config: VaultConfig):
    """The vault knows the policy of its config."""
    async with await open_vault(with_policy(vault_config, "keep", 120)) as vault:
        assert CvvRetention("keep", 120) == vault.cvv_retention
