"""Key rotation, on both backends: re-wrapping every DEK while a worker keeps reading."""

from __future__ import annotations

import asyncio
import random

from pci_side.vault import CardVault, append_version, open_vault
from relay.config import VaultConfig
from tests.vault_backends import generated_cards, run_sql


async def test_rotation_while_a_worker_keeps_loading_cards(vault_config: VaultConfig) -> None:
    """Loads during a rotation all succeed; afterwards every row is on the new version."""
    cards = generated_cards(300, merchants=("m1",))
    expected = {new.card_ref: new.card for new in cards}
    picker = random.Random(7)  # noqa: S311 - which cards to read, not a secret
    async with await open_vault(vault_config) as worker:
        await worker.import_cards(cards)
        # As in production: `rotate-key --generate` appends to the file in another process,
        # which then rotates; the worker only ever learns of version 2 from the rows.
        new_version = append_version(vault_config.kek_file)
        async with await open_vault(vault_config) as cli:
            rotation = asyncio.create_task(cli.rotate_key(batch_size=25))
            loads_during = 0
            while not rotation.done():
                refs = picker.sample(sorted(expected), 10)
                loaded = await asyncio.gather(*(worker.load_card(ref, "m1") for ref in refs))
                assert [expected[ref].pan for ref in refs] == [card.pan for card in loaded]
                loads_during += len(refs)
            report = await rotation
            again = await cli.rotate_key()
        versions = {summary.key_version for summary in await worker.list_cards(limit=1000)}
        after = [await worker.load_card(ref, "m1") for ref in sorted(expected)]
    assert ((300, 2), {2}, (0, 2)) == (
        (report.rewrapped, report.current_version),
        versions,
        (again.rewrapped, again.current_version),
    )
    assert 2 == new_version
    assert [expected[ref].pan for ref in sorted(expected)] == [card.pan for card in after]
    assert loads_during > 0


async def test_rotation_with_nothing_to_do_rewraps_nothing(vault: CardVault) -> None:
    """Without a new version, every row is already current."""
    await vault.import_cards(generated_cards(5))
    report = await vault.rotate_key()
    assert (0, 1) == (report.rewrapped, report.current_version)


async def test_rotation_touches_only_the_wrapped_key(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Rotation changes wrapped_dek and key_version and leaves every record ciphertext as it was."""
    await vault.import_cards(generated_cards(20))
    select = "SELECT card_ref, ciphertext, wrapped_dek FROM cards ORDER BY card_ref"
    before = run_sql(vault_config, select)
    append_version(vault_config.kek_file)
    await vault.rotate_key(batch_size=7)
    after = run_sql(vault_config, select)
    assert [bytes(row[1]) for row in before] == [bytes(row[1]) for row in after]
    assert [] == [
        row[0] for row, new in zip(before, after, strict=True) if bytes(row[2]) == bytes(new[2])
    ]


async def test_new_cards_are_sealed_under_the_current_version(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """After a rotation picks up version 2, imports use it too."""
    append_version(vault_config.kek_file)
    await vault.rotate_key()
    await vault.import_cards(generated_cards(1))
    [summary] = await vault.list_cards()
    assert (2, 2) == (summary.key_version, vault.key_version)
