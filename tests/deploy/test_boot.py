"""Boot the dev overlay from its own manifests and tokenize a card through the three parties.

Every Deployment of the rendered overlay (the Flex simulator, PciRelay with its seeding init
container, the MerchantGateway) runs as a local `relay` process with exactly its ConfigMap env
and its Secret files (test values) at its mount paths, on loopback ports that stand for its
container ports (tests/deploy/local_pods.py). A merchant app then calls the gateway's Service
over mutual TLS, and every readiness probe is asked as the kubelet asks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import checks
from tests.deploy.booting import booted, probe_answer, run_to_end, tokenize
from tests.deploy.local_pods import LocalCluster
from tests.deploy.manifests import Manifests
from tests.deploy.secret_files import TestSecrets


async def test_the_dev_overlay_boots_from_its_manifests_and_tokenizes(
    overlays: dict[str, Manifests], tmp_path: Path
):
    """Three processes started from the dev manifests alone hand a merchant app a token."""
    manifests = overlays["dev"]
    secrets = TestSecrets(manifests)
    cluster = LocalCluster(manifests, secrets.files, tmp_path / "pods")
    pods = cluster.pods()
    probes: dict[str, str] = {}
    async with booted(pods) as running:
        seeded = running.seeded()
        assert [] != seeded, "the init container seeded no card"
        card = seeded[0]
        token = await tokenize(cluster, secrets, card["card_ref"], tmp_path)
        for pod in pods:
            for container in pod.containers:
                for kind, probe in container.probes.items():
                    where = f"{container.workload}/{container.name} {kind}"
                    probes[where] = await probe_answer(probe)
        codes = await running.stop()

    assert (card["card_ref"], card["masked_pan"]) == (token.card_ref, token.masked_pan)
    assert token.jti
    assert dict.fromkeys(codes, 0) == codes
    serving = dict.fromkeys(probes, "SERVING")
    if serving != probes and checks.health_port_pending():
        pytest.xfail("the gRPC probes need the plaintext health port (RELAY_*_HEALTH_PORT)")
    assert serving == probes


async def test_a_pod_restart_reseeds_nothing_twice(overlays: dict[str, Manifests], tmp_path: Path):
    """The dev seed init container runs again on the same volume and exits 0 (idempotent)."""
    manifests = overlays["dev"]
    cluster = LocalCluster(manifests, TestSecrets(manifests).files, tmp_path)
    pod = cluster.pod(manifests.workload("relay-pci", "pci-relay"))
    assert [] != pod.init_containers

    first = [await run_to_end(container) for container in pod.init_containers]
    again = [await run_to_end(container) for container in pod.init_containers]
    assert first == again
