"""A typo in the rendered dev overlay fails the checks: a setting name, a mount, a key, a port.

Each case edits the YAML text that `kubectl kustomize deploy/overlays/dev` printed, exactly as a
typo in a source manifest would change it, and shows that the settings check of
tests/deploy/checks.py (the one test_settings.py runs on the real overlays) reports it. The
last case changes what only a running system can tell, and boots it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.errors import CardNotFound
from tests.deploy import checks
from tests.deploy.booting import booted, tokenize
from tests.deploy.local_pods import LocalCluster
from tests.deploy.manifests import Manifests, parse
from tests.deploy.secret_files import TestSecrets

MUTATIONS = [
    pytest.param(
        "RELAY_PCI_TLS_CERT_FILE:",
        "RELAY_PCI_TLS_CERT_FLIE:",
        "unknown setting RELAY_PCI_TLS_CERT_FLIE",
        id="misspelt-setting",
    ),
    pytest.param(
        "RELAY_MERCHANT_PCI_TARGET:",
        "RELAY_MERCHANT_PCI_TARGT:",
        "unknown setting RELAY_MERCHANT_PCI_TARGT",
        id="misspelt-setting-with-a-default",
    ),
    pytest.param(
        "mountPath: /etc/relay/vault-keys",
        "mountPath: /etc/relay/vault-key",
        "RELAY_VAULT_KEK_FILE names a file that does not exist",
        id="mount-path",
    ),
    pytest.param(
        "key: fingerprint-key",
        "key: fingerprint_key",
        "Secret relay-pci/pci-vault-keys has no key fingerprint_key",
        id="secret-key",
    ),
    pytest.param(
        "path: client-ca.crt",
        "path: client_ca.crt",
        "_CLIENT_CA_FILE names a file that does not exist",
        id="secret-item-path",
    ),
    pytest.param(
        "secretName: pci-relay-tls",
        "secretName: pci-relay-cert",
        "Secret relay-pci/pci-relay-cert is not one the README creates",
        id="secret-name",
    ),
    pytest.param(
        "pci-relay.relay-pci.svc.cluster.local:50051",
        "pci-relay.relay-pci.svc.cluster.local:50052",
        "Service relay-pci/pci-relay has no port 50052",
        id="service-port",
    ),
    pytest.param(
        "RELAY_MERCHANT_PCI_TARGET: pci-relay.relay-pci",
        "RELAY_MERCHANT_PCI_TARGET: pci-relais.relay-pci",
        "no Service relay-pci/pci-relais",
        id="service-name",
    ),
    pytest.param(
        "targetPort: https",
        "targetPort: http",
        "flexsim has no single container port 'http'",
        id="service-target-port",
    ),
    pytest.param(
        "containerPort: 50051",
        "containerPort: 50061",
        "pci-relay declares no container port 50051",
        id="container-port",
    ),
    pytest.param(
        'RELAY_PCI_HEALTH_PORT: "8081"',
        'RELAY_PCI_HEALTH_PORT: "8018"',
        "pci-relay declares no container port 8018",
        id="health-port",
    ),
    pytest.param(
        "RELAY_PCI_HOST: 0.0.0.0",
        "RELAY_PCI_HOST: 127.0.0.1",
        "RELAY_PCI_HOST=127.0.0.1 is unreachable in a pod",
        id="bind-address",
    ),
    pytest.param(
        "sqlite:////var/lib/relay/vault.db",
        "sqlite:///var/lib/relay/vault.db",
        "RELAY_VAULT_URL is a relative SQLite path",
        id="relative-sqlite-path",
    ),
    pytest.param(
        "- /etc/relay/flex/shared-secret",
        "- /etc/relay/flex/shared_secret",
        "relay flexsim serve: no file at",
        id="simulator-flag-path",
    ),
]


def mutated(text: str, old: str, new: str) -> Manifests:
    """The overlay with every occurrence of old replaced (each case's old must occur)."""
    assert old in text, f"nothing to mutate: {old!r} is not in the rendered overlay"
    return parse(text.replace(old, new))


@pytest.mark.parametrize(("old", "new", "expected"), MUTATIONS)
def test_a_typo_in_the_dev_overlay_is_reported(
    rendered: dict[str, str], tmp_path: Path, old: str, new: str, expected: str
):
    """The settings check names the problem a one-word change of the manifests causes."""
    problems = checks.settings_problems(mutated(rendered["dev"], old, new), tmp_path)
    assert [] != [problem for problem in problems if expected in problem], problems


async def test_a_seed_for_another_merchant_fails_the_boot(rendered: dict[str, str], tmp_path: Path):
    """Cards granted to a merchant the gateway is not: settings load, the token is refused."""
    text, count = re.subn(
        r"(- --merchant\n\s+- )demo_merchant", r"\1other_merchant", rendered["dev"]
    )
    assert 1 == count
    manifests = parse(text)
    assert [] == checks.settings_problems(manifests, tmp_path / "static")
    secrets = TestSecrets(manifests)
    cluster = LocalCluster(manifests, secrets.files, tmp_path / "pods")
    async with booted(cluster.pods()) as running:
        card_ref = running.seeded()[0]["card_ref"]
        with pytest.raises(CardNotFound):
            await tokenize(cluster, secrets, card_ref, tmp_path)
