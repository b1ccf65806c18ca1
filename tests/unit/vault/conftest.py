"""The vault tests run on both backends: the fixtures live in tests/vault_backends.py."""

from tests.vault_backends import (  # noqa: F401 - pytest finds fixtures by name in a conftest
    postgres_database,
    postgres_server,
    postgres_vault_config,
    sqlite_vault_config,
    vault,
    vault_config,
)
