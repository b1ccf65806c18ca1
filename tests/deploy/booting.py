"""Start the pods of a LocalCluster as `relay` processes, and ask them what the kubelet asks.

Pods start one after the other (none needs a peer to start, as in a cluster, where they start
in any order). Init containers run first, each to completion with exit code 0 (their stdout is
kept: the dev vault's seed prints the card_refs it loaded); then each container starts and
must log its `*_listening` line. Probes are asked as the kubelet asks them: a gRPC health
Check with the probe's `service` on the probe's port (plaintext, as the kubelet speaks), or a
TCP connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay.client import MerchantClient, Token
from relay.dev.procs import Child
from tests.cards_testdata import assert_no_test_pans
from tests.deploy.local_pods import LocalCluster, LocalContainer, LocalPod
from tests.deploy.secret_files import TestSecrets

READY_EVENTS = {
    ("flexsim", "serve"): "flexsim_listening",
    ("pci", "serve"): "pci_listening",
    ("merchant", "serve"): "merchant_listening",
}
GATEWAY_SERVICE = ("relay-merchant", "merchant-gateway", 50052)
"""Where merchant apps call: merchant-gateway.relay-merchant.svc.cluster.local:50052."""
GATEWAY_NAME = "merchant-gateway.relay-merchant.svc.cluster.local"


class InitFailed(AssertionError):
    """An init container exited with an error."""


@dataclasses.dataclass
class Booted:
    """The running containers of every pod, and what the init containers printed."""

    children: dict[str, Child]
    init_output: dict[str, str]

    def seeded(self) -> list[dict[str, str]]:
        """The JSON lines printed by the init containers (the seeded cards, masked)."""
        return [
            json.loads(line)
            for text in self.init_output.values()
            for line in text.splitlines()
            if line.startswith("{")
        ]

    async def stop(self) -> dict[str, int]:
        """SIGTERM every container, last started first; their exit codes."""
        codes = {}
        for name, child in reversed(self.children.items()):
            codes[name] = await child.stop(timeout=20)
        return codes

    def output(self) -> str:
        """Everything every process wrote."""
        lines = [line for child in self.children.values() for line in child.lines]
        return "\n".join([*lines, *self.init_output.values()])


@contextlib.asynccontextmanager
async def booted(pods: list[LocalPod]) -> AsyncIterator[Booted]:
    """Start every pod, one after the other; stop them all on exit."""
    state = Booted({}, {})
    try:
        for pod in pods:
            await _start_pod(pod, state)
        yield state
    finally:
        await state.stop()
        assert_no_test_pans(state.output(), "the pods' output")


async def _start_pod(pod: LocalPod, state: Booted) -> None:
    for container in pod.init_containers:
        state.init_output[f"{container.workload}/{container.name}"] = await run_to_end(container)
    for container in pod.containers:
        event = READY_EVENTS[container.args[0], container.args[1]]
        name = f"{container.workload}/{container.name}"
        child = await Child.start(name, container.args, ready_event=event, env=container.env)
        state.children[name] = child


async def run_to_end(container: LocalContainer) -> str:
    """Run an init container's command; its stdout, or InitFailed with its last lines."""
    process = await asyncio.create_subprocess_exec(
        *container.argv,
        env=container.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    text = out.decode(errors="replace")
    assert_no_test_pans(text + err.decode(errors="replace"), f"{container.name} output")
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        message = f"{container.name} exited {process.returncode}: {' | '.join(tail)}"
        raise InitFailed(message)
    return text


async def probe_answer(probe: dict[str, dict[str, object]]) -> str:
    """What the kubelet would conclude from one probe: 'SERVING', a status name, or an error."""
    if "grpc" in probe:
        return await _grpc_health(
            int(str(probe["grpc"]["port"])), str(probe["grpc"].get("service", ""))
        )
    if "tcpSocket" in probe:
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", int(str(probe["tcpSocket"]["port"]))
            )
        except OSError as exc:
            return f"connection refused ({exc.strerror})"
        writer.close()
        await writer.wait_closed()
        return "SERVING"
    return f"unsupported probe {sorted(probe)}"


async def _grpc_health(port: int, service: str) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


async def tokenize(cluster: LocalCluster, secrets: TestSecrets, card_ref: str, tmp: Path) -> Token:
    """RequestToken as a merchant app: its client certificate, through the gateway's Service."""
    directory = tmp / "merchant-app"
    directory.mkdir(exist_ok=True)
    files = {
        "ca_file": (directory / "gateway-ca.crt", secrets.gateway_ca.cert_pem),
        "cert_file": (directory / "app.crt", secrets.app.cert_pem),
        "key_file": (directory / "app.key", secrets.app.key_pem),
    }
    for path, data in files.values():
        path.write_bytes(data)
    address = cluster.service_address(*GATEWAY_SERVICE)
    credentials = {name: path for name, (path, _) in files.items()}
    async with MerchantClient.connect(address, server_name=GATEWAY_NAME, **credentials) as app:
        return await app.request_token("deploy-boot-0001", card_ref)
