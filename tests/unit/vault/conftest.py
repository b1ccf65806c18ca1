"""The vault tests run on both backends: the fixtures come from tests/vault_backends.py,
which tests/conftest.py loads as a plugin for the whole suite."""
