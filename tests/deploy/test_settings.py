"""The overlays configure processes that start: every name is a setting, every setting is set.

STYLE section 4: deploy/ sets only RELAY_* names, each checked against relay/config.py, and
mounts secrets as files. Here each process's settings are loaded by its own entry point's
loader from exactly the env and files the overlay gives it (tests/deploy/checks.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import known_variables
from tests.deploy import checks
from tests.deploy.manifests import OVERLAYS, Manifests
from tests.deploy.secret_files import documented_secrets, mounted_secrets

overlay_names = pytest.mark.parametrize("overlay", OVERLAYS)


@overlay_names
def test_every_configured_name_is_a_relay_setting(overlays: dict[str, Manifests], overlay: str):
    """Each ConfigMap key is a RELAY_* name some entry point reads, and not a refused one."""
    names = checks.configured_names(overlays[overlay])
    assert names
    assert all(name.startswith("RELAY_") for name in names)
    assert set() == checks.unknown_names(overlays[overlay])
    assert set() == names & checks.REFUSED_VARIABLES
    if checks.health_port_pending() and names - known_variables():
        pytest.xfail("RELAY_*_HEALTH_PORT is not read by relay/config.py yet")


@overlay_names
def test_every_process_starts_with_what_the_overlay_gives_it(
    overlays: dict[str, Manifests], overlay: str, tmp_path: Path
):
    """Each container's settings load from its ConfigMap env and Secret files, problem-free."""
    assert [] == checks.settings_problems(overlays[overlay], tmp_path)


@overlay_names
def test_secrets_are_never_inline_values(overlays: dict[str, Manifests], overlay: str):
    """No ConfigMap value is a secret: secret settings are only ever *_FILE paths."""
    secret_names = {
        "RELAY_FLEX_SHARED_SECRET",
        "RELAY_VAULT_FINGERPRINT_KEY",
        "RELAY_VAULT_KEK",
        "RELAY_MERCHANT_LEDGER_URL",
    }
    for doc in overlays[overlay].of_kind("ConfigMap"):
        for name, value in doc.get("data", {}).items():
            # A DSN carries a password; memory and a SQLite file path carry none.
            plain = value == "memory" or value.startswith("sqlite:///")
            assert name not in secret_names or plain, name
            assert "://" not in value or "@" not in value, f"{name} carries credentials"
        url = doc.get("data", {}).get("RELAY_VAULT_URL", "sqlite:///")
        assert url.startswith("sqlite:///"), "a PostgreSQL DSN belongs in RELAY_VAULT_URL_FILE"


@overlay_names
def test_the_readme_creates_every_mounted_secret(overlays: dict[str, Manifests], overlay: str):
    """deploy/README.md has a `kubectl create secret` command, with each key, per Secret used."""
    documented = documented_secrets()
    for secret, keys in mounted_secrets(overlays[overlay]).items():
        assert secret in documented, f"{secret} has no create command in deploy/README.md"
        assert keys <= documented[secret], secret


def test_the_readme_documents_no_secret_nobody_mounts(overlays: dict[str, Manifests]):
    """Each Secret the README creates is mounted by some overlay, with exactly those keys."""
    mounted: dict[tuple[str, str], frozenset[str]] = {}
    for manifests in overlays.values():
        for secret, keys in mounted_secrets(manifests).items():
            mounted[secret] = mounted.get(secret, frozenset()) | keys
    assert mounted == documented_secrets()
