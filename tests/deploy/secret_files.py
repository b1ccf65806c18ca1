"""The Secrets deploy/README.md tells an operator to create, filled with values made here.

Each Secret is keyed by (namespace, name) and holds files by key, exactly as the README's
`kubectl create secret generic ... --from-file=KEY=...` commands create them. The certificates
come from relay.dev.tlsgen, one CA per trust relation, so a manifest that mounts the wrong CA (or
the wrong certificate) fails the TLS handshake of the boot test instead of passing by luck.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Mapping

from relay.dev import tlsgen
from relay.receipts import generate_receipt_key
from tests.deploy.manifests import DEPLOY, ManifestError, Manifests, Workload

SecretKey = tuple[str, str]
"""(namespace, Secret name)."""

APP_ID = "deploy-test-app"
DSN_PCI = "postgresql://relay_vault:vault-password@vault-db.example:5432/vault?sslmode=verify-full"
DSN_LEDGER = "postgresql://relay_ledger:ledger-password@ledger-db.example:5432/ledger"
_CREATE = re.compile(r"kubectl -n (?P<ns>\S+) create secret generic (?P<name>\S+)(?P<rest>.*)")
_FROM_FILE = re.compile(r"--from-file=(?P<key>[^=\s]+)=")


def _b64(size: int = 32) -> bytes:
    return base64.b64encode(secrets.token_bytes(size)) + b"\n"


class TestSecrets:
    """Fresh test values for every Secret of the README, for one set of manifests."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, manifests: Manifests) -> None:
        """Make the CAs, certificates and keys; server names follow the manifests' Services."""
        self.flex_ca = tlsgen.new_ca("deploy test: Flex simulator CA")
        self.pci_ca = tlsgen.new_ca("deploy test: PciRelay server CA")
        self.merchants_ca = tlsgen.new_ca("deploy test: merchant client CA")
        self.gateway_ca = tlsgen.new_ca("deploy test: MerchantGateway server CA")
        self.apps_ca = tlsgen.new_ca("deploy test: merchant apps client CA")
        self.merchant_id = _merchant_id(manifests)
        self.app = tlsgen.issue_app(self.apps_ca, APP_ID)
        self.shared_secret = _b64()
        self.files = self._files(manifests)

    def _files(self, manifests: Manifests) -> dict[SecretKey, dict[str, bytes]]:
        flexsim = _server(self.flex_ca, manifests, "relay-flexsim", "flexsim", loopback=True)
        pci = _server(self.pci_ca, manifests, "relay-pci", "pci-relay")
        gateway = _server(self.gateway_ca, manifests, "relay-merchant", "merchant-gateway")
        merchant = tlsgen.issue_client(self.merchants_ca, self.merchant_id)
        return {
            ("relay-flexsim", "flexsim-tls"): _pair(flexsim),
            ("relay-flexsim", "flexsim-credentials"): {"shared-secret": self.shared_secret},
            ("relay-pci", "pci-relay-tls"): _pair(pci, {"client-ca.crt": self.merchants_ca}),
            ("relay-pci", "pci-vault-keys"): {
                "kek": b"1:" + _b64(),
                "fingerprint-key": _b64(),
                "audit.key": secrets.token_bytes(32),
            },
            ("relay-pci", "pci-vault-dsn"): {"dsn": DSN_PCI.encode()},
            ("relay-pci", "pci-receipt-key"): {"receipt.key": generate_receipt_key()},
            ("relay-pci", "flexsim-ca"): {"ca.crt": self.flex_ca.cert_pem},
            ("relay-merchant", "merchant-gateway-tls"): _pair(
                gateway, {"client-ca.crt": self.apps_ca}
            ),
            ("relay-merchant", "merchant-pci-client-tls"): _pair(merchant, {"ca.crt": self.pci_ca}),
            ("relay-merchant", "merchant-flex-credentials"): {"shared-secret": self.shared_secret},
            ("relay-merchant", "merchant-ledger-dsn"): {"dsn": DSN_LEDGER.encode()},
            ("relay-merchant", "flexsim-ca"): {"ca.crt": self.flex_ca.cert_pem},
        }


def _merchant_id(manifests: Manifests) -> str:
    """The merchant the gateway speaks for: its client certificate to PciRelay names it."""
    for workload in manifests.workloads:
        for container in workload.containers:
            env = manifests.config_env(workload.namespace, container)
            if "RELAY_FLEX_MERCHANT_ID" in env:
                return env["RELAY_FLEX_MERCHANT_ID"]
    return "no-merchant-configured"


def _server(
    ca: tlsgen.Issued, manifests: Manifests, namespace: str, name: str, *, loopback: bool = False
) -> tlsgen.Issued:
    """A server certificate for the cluster names of the Services in front of a Deployment.

    Only the Flex simulator also gets 127.0.0.1: its clients reach it by URL, which the boot
    test rewrites to loopback. The gRPC clients check the name set in their configuration.
    """
    try:
        names = manifests.service_names_of(manifests.workload(namespace, name))
    except ManifestError:
        names = []
    hosts = (*(names or [f"{name}.{namespace}.svc.cluster.local"]), "localhost")
    return tlsgen.issue_server(ca, (*hosts, "127.0.0.1") if loopback else hosts)


def _pair(
    issued: tlsgen.Issued, cas: Mapping[str, tlsgen.Issued] | None = None
) -> dict[str, bytes]:
    files = {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem}
    files.update({key: ca.cert_pem for key, ca in (cas or {}).items()})
    return files


def documented_secrets() -> dict[SecretKey, frozenset[str]]:
    """(namespace, name) -> keys, from the `kubectl create secret` commands of the README."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    found: dict[SecretKey, frozenset[str]] = {}
    for line in text.splitlines():
        match = _CREATE.search(line)
        if match:
            keys = frozenset(_FROM_FILE.findall(match["rest"]))
            found[match["ns"], match["name"]] = found.get((match["ns"], match["name"]), keys) | keys
    return found


def mounted_secrets(manifests: Manifests) -> dict[SecretKey, frozenset[str]]:
    """(namespace, name) -> keys, of every Secret volume of every Deployment."""
    found: dict[SecretKey, frozenset[str]] = {}
    for workload in manifests.workloads:
        for volume in workload.pod.get("volumes", []):
            if "secret" in volume:
                key = (workload.namespace, volume["secret"]["secretName"])
                items = frozenset(i["key"] for i in volume["secret"].get("items", []))
                found[key] = found.get(key, frozenset()) | items
    return found


def secret_volumes(workload: Workload) -> list[dict[str, object]]:
    """The Secret volume sources of a Deployment's pod."""
    return [v["secret"] for v in workload.pod.get("volumes", []) if "secret" in v]
