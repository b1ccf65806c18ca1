"""What each relay process of an overlay would read at start-up, loaded as it would load it.

`settings_problems` builds the overlay's pods locally (local_pods), then loads each
container's settings with the entry point's own loader (`PciSettings.from_env`,
`MerchantSettings.from_env`, `VaultSettings.from_env`, the `relay flexsim serve` parser) from
exactly that env and those files. The unmodified overlays must give no problem; a mutated copy
(test_mutations.py) must give the problem its mutation causes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from pathlib import Path

from relay.cli import build_parser
from relay.config import MerchantSettings, PciSettings, VaultSettings, known_variables
from relay.errors import ConfigError
from tests.deploy.local_pods import BIND_ALL, LocalCluster, LocalContainer
from tests.deploy.manifests import ManifestError, Manifests
from tests.deploy.secret_files import TestSecrets

# Proposed for the plaintext health port of the kubelet's gRPC probes (deploy/README.md,
# "Probes"); tolerated only until relay/config.py reads them.
HEALTH_PORT_VARIABLES = frozenset({"RELAY_PCI_HEALTH_PORT", "RELAY_MERCHANT_HEALTH_PORT"})
REFUSED_VARIABLES = frozenset({"RELAY_FLEX_SHARED_SECRET"})


def health_port_pending() -> bool:
    """Whether relay/config.py does not read the health-port variables yet."""
    return not HEALTH_PORT_VARIABLES <= known_variables()


def configured_names(manifests: Manifests) -> set[str]:
    """Every variable name a ConfigMap of the overlay sets."""
    return {str(key) for doc in manifests.of_kind("ConfigMap") for key in doc.get("data", {})}


def unknown_names(manifests: Manifests) -> set[str]:
    """Names set in a ConfigMap that no entry point reads, or that are refused by design."""
    names = configured_names(manifests)
    tolerated = HEALTH_PORT_VARIABLES if health_port_pending() else frozenset()
    return ((names - known_variables()) | (names & REFUSED_VARIABLES)) - tolerated


def _pci(container: LocalContainer) -> object:
    _check_bind(container.manifest_env.get("RELAY_PCI_HOST"), "RELAY_PCI_HOST")
    return PciSettings.from_env(container.env)


def _merchant(container: LocalContainer) -> object:
    _check_bind(container.manifest_env.get("RELAY_MERCHANT_HOST"), "RELAY_MERCHANT_HOST")
    return MerchantSettings.from_env(container.env)


def _vault(container: LocalContainer) -> object:
    return VaultSettings.from_env(container.env)


def _flexsim(container: LocalContainer) -> object:
    parsed = _parse(container.args)
    files = [parsed.shared_secret_file, parsed.tls_cert, parsed.tls_key]
    missing = [str(path) for path in files if path is not None and not Path(path).is_file()]
    if missing:
        raise ConfigError([f"relay flexsim serve: no file at {', '.join(missing)}"])
    _check_bind(_parse(container.manifest_args).host, "--host")
    return parsed


def _parse(args: list[str]) -> argparse.Namespace:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return build_parser().parse_args(args)
    except SystemExit:
        raise ConfigError(["the relay command refuses these arguments"]) from None


def _check_bind(host: str | None, name: str) -> None:
    """A pod is reached on its own address: a server must bind all interfaces, not loopback."""
    if host not in BIND_ALL:
        raise ConfigError([f"{name} binds {host or 'the default, 127.0.0.1'}: unreachable"])


LOADERS: dict[tuple[str, str], Callable[[LocalContainer], object]] = {
    ("pci", "serve"): _pci,
    ("merchant", "serve"): _merchant,
    ("pci", "seed-demo"): _vault,
    ("flexsim", "serve"): _flexsim,
}


def load_settings(container: LocalContainer) -> object:
    """The settings the container's command would start with; ConfigError if it would not."""
    command = [*container.args, "", ""][:2]
    loader = LOADERS.get((command[0], command[1]))
    if loader is None:
        raise ConfigError([f"{container.workload}/{container.name}: unknown command"])
    if "--insecure-dev" in container.args:
        raise ConfigError([f"{container.workload}/{container.name}: --insecure-dev in a pod"])
    return loader(container)


def settings_problems(manifests: Manifests, root: Path) -> list[str]:
    """Every reason the overlay's processes would not start as configured; [] when they would."""
    problems = [f"unknown setting {name}" for name in sorted(unknown_names(manifests))]
    try:
        pods = LocalCluster(manifests, TestSecrets(manifests).files, root).pods()
    except ManifestError as exc:
        return [*problems, str(exc)]
    for pod in pods:
        for container in [*pod.init_containers, *pod.containers]:
            try:
                load_settings(container)
            except ConfigError as exc:
                problems.append(f"{container.workload}/{container.name}: {exc}")
    return problems
