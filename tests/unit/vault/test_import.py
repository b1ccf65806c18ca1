"""Importing cards, on both backends: statuses, idempotence, dedupe and all-or-nothing batches."""

from __future__ import annotations

import pytest

from pci_side.vault import CardVault, ImportOutcome, NewCard, VaultStorageError
from relay.cards import CardData, Pan
from relay.config import VaultConfig
from tests.cards_testdata import TEST_PANS
from tests.vault_backends import generated_cards, run_sql

_FAIL_ON_GRANT = {
    "sqlite": (
        """CREATE TRIGGER fail_grant BEFORE INSERT ON grants WHEN NEW.card_ref = 'boom'
           BEGIN SELECT RAISE(ABORT, 'refused'); END""",
    ),
    "postgresql": (
        """CREATE FUNCTION fail_grant() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.card_ref = 'boom' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW;
           END $$""",
        """CREATE TRIGGER fail_grant BEFORE INSERT ON grants
           FOR EACH ROW EXECUTE FUNCTION fail_grant()""",
    ),
}
_DROP_FAIL_ON_GRANT = {
    "sqlite": "DROP TRIGGER fail_grant",
    "postgresql": "DROP TRIGGER fail_grant ON grants",
}


def new(card_ref: str, index: int, *merchants: str) -> NewCard:
    return NewCard(card_ref, CardData(Pan(TEST_PANS[index]), 1, 2030), merchants)


def statuses(outcomes: list[ImportOutcome]) -> list[str]:
    return [outcome.status for outcome in outcomes]


async def test_reimport_of_the_same_cards_changes_nothing(vault: CardVault) -> None:
    """A second import of the same input is all "unchanged" and leaves every row as it was."""
    batch = [new("a", 0, "m1"), new("b", 1, "m1", "m2")]
    first = await vault.import_cards(batch)
    before = await vault.list_cards()
    second = await vault.import_cards(batch)
    assert (["created", "created"], ["unchanged", "unchanged"]) == (
        statuses(first),
        statuses(second),
    )
    assert (before, 2) == (await vault.list_cards(), await vault.count_cards())


async def test_unchanged_card_gets_the_grants_it_lacks(vault: CardVault) -> None:
    """Re-importing a card with more merchants adds only the missing grants."""
    await vault.import_cards([new("a", 0, "m1")])
    [outcome] = await vault.import_cards([new("a", 0, "m1", "m2")])
    [summary] = await vault.list_cards()
    assert ("unchanged", ("m1", "m2")) == (outcome.status, summary.merchants)


async def test_card_ref_holding_another_card_is_a_conflict(vault: CardVault) -> None:
    """Another PAN under an existing card_ref is refused and the stored card stays."""
    await vault.import_cards([new("a", 0, "m1")])
    [outcome] = await vault.import_cards([new("a", 1, "m2")])
    loaded = await vault.load_card("a", "m1")
    [summary] = await vault.list_cards()
    assert ("card_ref_conflict", True, ("m1",)) == (
        outcome.status,
        Pan(TEST_PANS[0]) == loaded.pan,
        summary.merchants,
    )


async def test_same_pan_under_another_card_ref_is_a_duplicate(vault: CardVault) -> None:
    """A PAN already stored under another card_ref is refused (dedupe by fingerprint)."""
    await vault.import_cards([new("a", 0)])
    [outcome] = await vault.import_cards([new("b", 0, "m1")])
    assert ("duplicate_card", 1) == (outcome.status, await vault.count_cards())


async def test_statuses_account_for_earlier_cards_of_the_same_batch(vault: CardVault) -> None:
    """Within one batch a card is checked against the cards before it, as if imported singly."""
    batch = [new("a", 0, "m1"), new("a", 0, "m2"), new("b", 0), new("a", 1), new("c", 2)]
    outcomes = await vault.import_cards(batch)
    [a, c] = await vault.list_cards()
    assert ["created", "unchanged", "duplicate_card", "card_ref_conflict", "created"] == statuses(
        outcomes
    )
    assert (("m1", "m2"), ()) == (a.merchants, c.merchants)


async def test_a_batch_is_written_whole_or_not_at_all(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """When the database refuses one grant, no card and no grant of the batch is written."""
    for statement in _FAIL_ON_GRANT[vault_config.backend]:
        run_sql(vault_config, statement)
    batch = [new("first", 0, "m1"), new("boom", 1, "m1"), new("last", 2, "m1")]
    with pytest.raises(VaultStorageError) as info:
        await vault.import_cards(batch)
    counts = [run_sql(vault_config, f"SELECT count(*) FROM {t}")[0][0] for t in ("cards", "grants")]  # noqa: S608
    assert ([0, 0], "vault database refused a statement") == (counts, str(info.value))
    run_sql(vault_config, _DROP_FAIL_ON_GRANT[vault_config.backend])
    assert ["created"] * 3 == statuses(await vault.import_cards(batch))


async def test_card_rows_and_grants_appear_together(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Every created card has exactly its grants; refused cards leave no grant behind."""
    await vault.import_cards([new("a", 0, "m1", "m2")])
    await vault.import_cards([new("b", 0, "m3"), new("a", 1, "m4"), new("c", 2, "m5")])
    grants = run_sql(vault_config, "SELECT card_ref, merchant_id FROM grants ORDER BY 1, 2")
    assert [("a", "m1"), ("a", "m2"), ("c", "m5")] == [tuple(row) for row in grants]


async def test_an_empty_batch_does_nothing(vault: CardVault) -> None:
    """import_cards([]) returns [] and writes nothing."""
    assert ([], 0) == (await vault.import_cards([]), await vault.count_cards())


async def test_batches_of_generated_cards_import_and_reimport(vault: CardVault) -> None:
    """1,500 cards in batches of 500 are all created, then all unchanged on a second run."""
    cards = generated_cards(1500, merchants=("m1",))
    runs = []
    for _ in range(2):
        outcomes = []
        for start in range(0, len(cards), 500):
            outcomes += await vault.import_cards(cards[start : start + 500])
        runs.append(set(statuses(outcomes)))
    assert ([{"created"}, {"unchanged"}], 1500) == (runs, await vault.count_cards())
