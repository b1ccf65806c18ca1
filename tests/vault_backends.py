"""Card vault backends for tests: every vault test runs on SQLite and on PostgreSQL.

Using the fixtures
------------------
Import them into the conftest.py of the test directory that needs them (as
tests/unit/vault/conftest.py does)::

    from tests.vault_backends import (  # noqa: F401 - pytest fixtures
        postgres_database, postgres_server, vault, vault_config, sqlite_vault_config,
        postgres_vault_config,
    )

or, once for the whole suite, add ``"tests.vault_backends"`` to ``pytest_plugins`` in
tests/conftest.py (then a session has one PostgreSQL database, not one per directory).

- ``vault_config``: a ``VaultConfig`` parametrized over ``["sqlite", "postgresql"]``, so a test
  that asks for it runs once per backend (ids ``[sqlite]`` and ``[postgresql]``). Each test gets
  a fresh, empty vault: a new SQLite file under tmp_path, or a new schema in the run's
  PostgreSQL database (selected with ``options=-c search_path=...`` in the URL, so any process
  given the URL, a worker or a CLI subprocess, sees the same schema). It comes with a keyring
  file of one fresh KEK version (``config.kek_file``), a random fingerprint key and a random
  audit key.
- ``sqlite_vault_config`` / ``postgres_vault_config``: the same for one backend only.
- ``vault``: an open ``CardVault`` on ``vault_config``, closed after the test.
- ``postgres_server`` (session): an admin DSN. ``RELAY_TEST_POSTGRES_DSN`` if set (it must
  answer: a broken setting fails the run, it never skips), else 127.0.0.1:5432 as user postgres
  if that answers, else a throwaway server started with pgserver under a temp directory and
  stopped at the end (CORRECTIONS.md item 3).
- ``postgres_database`` (session): the URL of a database of the run's own,
  ``relay_test_<random>``, created at the start and dropped (WITH FORCE) at the end.

Helpers for any test: ``make_vault_config`` (a config for a given URL), ``vault_env`` (the
``RELAY_VAULT_*`` variables, with the secret files written, for a subprocess), ``run_sql``
(raw SQL on the vault's database with ``?`` placeholders on both backends, to tamper with rows
as an attacker with database access would), ``drop_audit_guards`` (drop the append-only
triggers first, as such an attacker would), and ``generated_pan``/``generated_cards`` (bulk
Luhn-valid cards; they are not the published test PANs the leak scan knows, so never print them).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sqlite3
import tempfile
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
import psycopg.conninfo
import pytest

from pci_side.vault import CardVault, NewCard, create_keyring, open_vault
from relay.cards import CardData, Pan, SecurityCode, luhn_ok
from relay.config import VaultConfig
from relay.secrets import Secret

BACKENDS: Final = ("sqlite", "postgresql")
LOCAL_POSTGRES: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
DSN_VARIABLE: Final = "RELAY_TEST_POSTGRES_DSN"

_AUDIT_GUARDS: Final = {
    "sqlite": (
        "DROP TRIGGER audit_log_no_update",
        "DROP TRIGGER audit_log_no_delete",
        "DROP TRIGGER audit_head_forward",
        "DROP TRIGGER audit_head_no_delete",
    ),
    "postgresql": (
        "DROP TRIGGER audit_log_append_only ON audit_log",
        "DROP TRIGGER audit_log_no_truncate ON audit_log",
        "DROP TRIGGER audit_head_forward ON audit_head",
    ),
}


# --- PostgreSQL: one server per session, one database per run, one schema per test ----------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """An admin DSN of a PostgreSQL server: configured, local, or a throwaway one."""
    configured = os.environ.get(DSN_VARIABLE, "").strip()
    if configured:
        with psycopg.connect(configured, connect_timeout=10):
            pass  # fail the run, loudly, if the configured server does not answer
        yield configured
    elif _answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
    else:
        with _throwaway_server() as dsn:
            yield dsn


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def _throwaway_server() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="relay-pg-") as directory:
        # pgserver and platformdirs warn about the environment (no XDG_RUNTIME_DIR); the suite
        # turns warnings into errors, and these say nothing about our code.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver  # noqa: PLC0415 - only needed where no server answers

            server = pgserver.get_server(  # type: ignore[attr-defined]
                Path(directory) / "pgdata", cleanup_mode="stop"
            )
        try:
            yield server.get_uri()
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server.cleanup()


@pytest.fixture(scope="session")
def postgres_database(postgres_server: str) -> Iterator[str]:
    """The URL of this run's own database, dropped at the end of the session."""
    name = f"relay_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")  # a generated identifier, never input
    try:
        yield postgres_url(postgres_server, dbname=name)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_url(dsn: str, **changes: str) -> str:
    """A postgresql:// URL for dsn with some parameters changed (VaultConfig needs URL form)."""
    params = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items() if v is not None}
    params.update(changes)
    dbname = urllib.parse.quote(str(params.pop("dbname", "postgres")), safe="")
    query = urllib.parse.urlencode(
        {k: str(v) for k, v in params.items()}, quote_via=urllib.parse.quote
    )
    return f"postgresql:///{dbname}?{query}"


@contextlib.contextmanager
def postgres_schema(database_url: str) -> Iterator[str]:
    """A fresh, empty schema in the run's database; yields a URL whose search_path is it."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield postgres_url(database_url, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


# --- Configs and vaults -----------------------------------------------------------------------


def make_vault_config(url: str, directory: Path, *, pool_size: int = 4) -> VaultConfig:
    """A VaultConfig for url: a new one-version keyring, random fingerprint and audit keys."""
    kek_file = directory / f"kek-{secrets.token_hex(4)}.txt"
    create_keyring(kek_file)
    return VaultConfig(
        url=Secret(url),
        kek_file=str(kek_file),
        fingerprint_key=Secret(secrets.token_bytes(32)),
        audit_key=Secret(secrets.token_bytes(32)),
        pool_size=pool_size,
    )


def vault_env(config: VaultConfig, directory: Path) -> dict[str, str]:
    """The RELAY_VAULT_* variables naming config, its secrets written to 0600 files."""
    url_file = directory / f"vault-url-{secrets.token_hex(4)}"
    key_file = directory / f"fingerprint-key-{secrets.token_hex(4)}"
    key = base64.b64encode(config.fingerprint_key.get_secret_value()).decode("ascii")
    for path, text in ((url_file, config.url.get_secret_value()), (key_file, key)):
        path.write_text(text + "\n", encoding="utf-8")
        path.chmod(0o600)
    audit_file = directory / f"audit-key-{secrets.token_hex(4)}"
    audit_file.touch(mode=0o600)
    audit_file.write_bytes(config.audit_key.get_secret_value())
    return {
        "RELAY_VAULT_URL_FILE": str(url_file),
        "RELAY_VAULT_KEK_FILE": config.kek_file,
        "RELAY_VAULT_FINGERPRINT_KEY_FILE": str(key_file),
        "RELAY_VAULT_AUDIT_KEY_FILE": str(audit_file),
        "RELAY_VAULT_POOL_SIZE": str(config.pool_size),
    }


@pytest.fixture
def sqlite_vault_config(tmp_path: Path) -> VaultConfig:
    """A fresh SQLite vault file."""
    return make_vault_config(f"sqlite:///{tmp_path / 'vault.db'}", tmp_path)


@pytest.fixture
def postgres_vault_config(postgres_database: str, tmp_path: Path) -> Iterator[VaultConfig]:
    """A fresh schema in the run's PostgreSQL database."""
    with postgres_schema(postgres_database) as url:
        yield make_vault_config(url, tmp_path)


@pytest.fixture(params=BACKENDS)
def vault_config(request: pytest.FixtureRequest) -> VaultConfig:
    """A fresh, empty vault on each backend in turn."""
    config: VaultConfig = request.getfixturevalue(f"{_fixture_prefix(request.param)}_vault_config")
    return config


def _fixture_prefix(backend: str) -> str:
    return "postgres" if backend == "postgresql" else backend


@pytest.fixture
async def vault(vault_config: VaultConfig) -> AsyncIterator[CardVault]:
    """An open vault on vault_config."""
    async with await open_vault(vault_config) as opened:
        yield opened


# --- Raw SQL, as an attacker with database access would use it --------------------------------


def run_sql(config: VaultConfig, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement with ? placeholders on the vault's database; return its rows."""
    url = config.url.get_secret_value()
    if config.backend == "sqlite":
        path = url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as connection, connection:
            return connection.execute(sql, tuple(params)).fetchall()
    with psycopg.connect(url, autocommit=True) as pg:
        query = sql.replace("?", "%s") if params else sql
        cursor = pg.execute(query, tuple(params) or None)
        return cursor.fetchall() if cursor.description else []


def drop_audit_guards(config: VaultConfig) -> None:
    """Drop the triggers that make the audit log append-only, as an attacker would first."""
    for statement in _AUDIT_GUARDS[config.backend]:
        run_sql(config, statement)


# --- Bulk cards ---------------------------------------------------------------------------------


def generated_pan(index: int, prefix: str = "4000") -> str:
    """A Luhn-valid 16-digit number made from index; not a published test PAN: never print it."""
    body = f"{prefix}{index:0{15 - len(prefix)}d}"
    return next(body + digit for digit in "0123456789" if luhn_ok(body + digit))


def generated_cards(
    count: int, *, merchants: tuple[str, ...] = (), start: int = 0, prefix: str = "bulk"
) -> list[NewCard]:
    """count NewCards with generated PANs, card_refs f"{prefix}-{index:06d}", every other a CVV."""
    return [
        NewCard(
            f"{prefix}-{index:06d}",
            CardData(
                Pan(generated_pan(index)),
                index % 12 + 1,
                2030 + index % 5,
                SecurityCode(f"{index % 1000:03d}") if index % 2 else None,
            ),
            merchants,
        )
        for index in range(start, start + count)
    ]
