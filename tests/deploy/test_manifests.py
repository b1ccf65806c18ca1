"""Invariants of every rendered overlay: wiring, budgets, network fences, pod hardening.

Each test reads `kubectl kustomize deploy/overlays/NAME` as the API server would receive it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.deploy.manifests import OVERLAYS, Manifests, Workload, labels_match

UID_MIN = 10000
TMP = "/tmp"  # noqa: S108  the path the pods mount an emptyDir on
PRE_STOP_MARGIN_SECONDS = 5
DRAIN_DEFAULT_SECONDS = 10.0
FLEX_TIMEOUT_DEFAULT_SECONDS = 10.0
NAMESPACE_LABEL = "kubernetes.io/metadata.name"
PRIVATE_RANGES = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "127.0.0.0/8",
    )
)
SERVICE_NAMES = {
    ("pci", "serve"): "relay.pb.v1.PciRelay",
    ("merchant", "serve"): "relay.pb.v1.MerchantGateway",
}

overlay_names = pytest.mark.parametrize("overlay", OVERLAYS)


def _pods_of(manifests: Manifests, kind: str) -> list[tuple[dict[str, Any], list[Workload]]]:
    """(resource, the Deployments its spec.selector picks) for each resource of kind."""
    return [
        (
            doc,
            manifests.selected(
                doc["metadata"]["namespace"], doc["spec"]["selector"]["matchLabels"]
            ),
        )
        for doc in manifests.of_kind(kind)
    ]


@overlay_names
def test_every_deployment_selects_its_own_pods(overlays: dict[str, Manifests], overlay: str):
    """A Deployment's selector matches its pod template labels and no other Deployment's pods."""
    manifests = overlays[overlay]
    assert manifests.workloads
    for workload in manifests.workloads:
        selector = workload.doc["spec"]["selector"]["matchLabels"]
        assert [workload.name] == [w.name for w in manifests.selected(workload.namespace, selector)]


@overlay_names
def test_every_service_targets_a_named_port_of_its_pods(
    overlays: dict[str, Manifests], overlay: str
):
    """Each Service selects exactly one Deployment and targets a container port by its name."""
    manifests = overlays[overlay]
    for service in manifests.of_kind("Service"):
        namespace = service["metadata"]["namespace"]
        workloads = manifests.selected(namespace, service["spec"]["selector"])
        assert 1 == len(workloads), service["metadata"]["name"]
        names = {port.get("name") for _, port in workloads[0].ports()}
        for port in service["spec"]["ports"]:
            assert isinstance(port["targetPort"], str), "target a named port, not a number"
            assert port["targetPort"] in names


@overlay_names
def test_every_container_port_is_named(overlays: dict[str, Manifests], overlay: str):
    """Container ports carry names (Services and NetworkPolicies refer to them)."""
    for workload in overlays[overlay].workloads:
        assert all(port.get("name") for _, port in workload.ports()), workload.name


@overlay_names
@pytest.mark.parametrize("kind", ["PodDisruptionBudget", "HorizontalPodAutoscaler"])
def test_one_budget_and_one_autoscaler_per_deployment(
    overlays: dict[str, Manifests], overlay: str, kind: str
):
    """Exactly one PDB and one HPA resolve to each Deployment, and each resolves to one."""
    manifests = overlays[overlay]
    if kind == "PodDisruptionBudget":
        targets = [[w.name for w in picked] for _, picked in _pods_of(manifests, kind)]
    else:
        targets = [[_hpa_target(manifests, doc).name] for doc in manifests.of_kind(kind)]
    assert all(1 == len(names) for names in targets)
    assert sorted(w.name for w in manifests.workloads) == sorted(n for [n] in targets)


def _hpa_target(manifests: Manifests, hpa: dict[str, Any]) -> Workload:
    ref = hpa["spec"]["scaleTargetRef"]
    assert ("apps/v1", "Deployment") == (ref["apiVersion"], ref["kind"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    return manifests.workload(hpa["metadata"]["namespace"], ref["name"])


@overlay_names
def test_each_namespace_denies_all_traffic_by_default(overlays: dict[str, Manifests], overlay: str):
    """Every namespace of the overlay has a policy selecting all pods with no rule either way."""
    manifests = overlays[overlay]
    namespaces = {doc["metadata"]["name"] for doc in manifests.of_kind("Namespace")}
    assert {"relay-merchant", "relay-pci"} <= namespaces
    for namespace in namespaces:
        deny = [
            p
            for p in manifests.of_kind("NetworkPolicy")
            if p["metadata"]["namespace"] == namespace
            and p["spec"]["podSelector"] == {}
            and {"Ingress", "Egress"} <= set(p["spec"]["policyTypes"])
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        assert 1 == len(deny), namespace


def _rules(manifests: Manifests, workload: Workload, direction: str) -> list[dict[str, Any]]:
    """Every ingress or egress rule of every policy that selects the Deployment's pods."""
    policy_type = direction.capitalize()
    return [
        rule
        for policy in manifests.of_kind("NetworkPolicy")
        if policy["metadata"]["namespace"] == workload.namespace
        and policy_type in policy["spec"]["policyTypes"]
        and labels_match(policy["spec"]["podSelector"].get("matchLabels", {}), workload.pod_labels)
        for rule in policy["spec"].get(direction, [])
    ]


@overlay_names
def test_pci_relay_admits_only_the_gateway_on_its_grpc_port(
    overlays: dict[str, Manifests], overlay: str
):
    """PciRelay's one ingress rule: MerchantGateway pods in relay-merchant, on the grpc port."""
    manifests = overlays[overlay]
    pci = manifests.workload("relay-pci", "pci-relay")
    gateway = manifests.workload("relay-merchant", "merchant-gateway")
    [rule] = _rules(manifests, pci, "ingress")
    [peer] = rule["from"]
    assert {"namespaceSelector", "podSelector"} == set(peer)
    assert {NAMESPACE_LABEL: "relay-merchant"} == peer["namespaceSelector"]["matchLabels"]
    picked = manifests.selected("relay-merchant", peer["podSelector"]["matchLabels"])
    assert [gateway.name] == [w.name for w in picked]
    [port] = rule["ports"]
    assert "TCP" == port["protocol"]
    assert pci.container_port("grpc") == pci.container_port(port["port"])


def _egress_kind(manifests: Manifests, rule: dict[str, Any]) -> str:
    """Name what an egress rule reaches: dns, flex, postgresql, or a Deployment; else fail."""
    ports = {(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]}
    [peer] = rule["to"]
    if "ipBlock" in peer:
        return _ip_block_kind(peer["ipBlock"], ports)
    namespace = peer["namespaceSelector"]["matchLabels"][NAMESPACE_LABEL]
    if namespace == "kube-system":
        assert {"k8s-app": "kube-dns"} == peer["podSelector"]["matchLabels"]
        assert {(53, "UDP"), (53, "TCP")} == ports
        return "dns"
    [workload] = manifests.selected(namespace, peer["podSelector"]["matchLabels"])
    assert {workload.container_port(port) for port, _ in ports} == {
        int(port["containerPort"]) for _, port in workload.ports() if port["name"] != "health"
    }
    return "flex" if workload.name == "flexsim" else workload.name


def _ip_block_kind(block: dict[str, Any], ports: set[tuple[int, str]]) -> str:
    network = ipaddress.IPv4Network(block["cidr"])
    if network.prefixlen == 0:
        excepted = [ipaddress.IPv4Network(n) for n in block.get("except", [])]
        assert all(any(r.subnet_of(e) for e in excepted) for r in PRIVATE_RANGES)
        assert {(443, "TCP")} == ports
        return "flex"
    assert {(5432, "TCP")} == ports
    return "postgresql"


@pytest.mark.parametrize(
    ("overlay", "namespace", "name", "expected"),
    [
        ("dev", "relay-pci", "pci-relay", {"dns", "flex"}),
        ("prod", "relay-pci", "pci-relay", {"dns", "flex", "postgresql"}),
        ("dev", "relay-merchant", "merchant-gateway", {"dns", "flex", "pci-relay"}),
        ("prod", "relay-merchant", "merchant-gateway", {"dns", "flex", "pci-relay", "postgresql"}),
        ("dev", "relay-flexsim", "flexsim", set()),
    ],
)
def test_egress_goes_only_to_dns_flex_postgresql_and_peers(
    overlays: dict[str, Manifests], overlay: str, namespace: str, name: str, expected: set[str]
):
    """Each side's egress reaches only DNS, Flex, its PostgreSQL and (gateway) PciRelay."""
    manifests = overlays[overlay]
    rules = _rules(manifests, manifests.workload(namespace, name), "egress")
    kinds = [_egress_kind(manifests, rule) for rule in rules]
    assert sorted(expected) == sorted(kinds)


@overlay_names
def test_env_comes_only_from_configmaps(overlays: dict[str, Manifests], overlay: str):
    """No env value is written inline or read from a Secret; secrets are files only."""
    manifests = overlays[overlay]
    for workload in manifests.workloads:
        for container in workload.all_containers():
            for source in container.get("envFrom", []):
                assert {"configMapRef"} == set(source)
                assert not source["configMapRef"].get("optional", False)
            for item in container.get("env", []):
                assert {"configMapKeyRef"} == set(item.get("valueFrom", {})), item["name"]
            manifests.config_env(workload.namespace, container)  # every reference resolves


@overlay_names
def test_images_are_pinned_never_latest(overlays: dict[str, Manifests], overlay: str):
    """Every container image names a registry and a version tag (or digest), never latest."""
    for workload in overlays[overlay].workloads:
        for container in workload.all_containers():
            image = container["image"]
            name, _, tag = image.partition("@")[0].rpartition(":")
            assert "/" in name, image
            assert tag, image
            assert "latest" != tag, image


@overlay_names
def test_every_pod_and_container_is_locked_down(overlays: dict[str, Manifests], overlay: str):
    """Non-root numeric user, no escalation, no capabilities, read-only root, seccomp, no token."""
    manifests = overlays[overlay]
    for workload in manifests.workloads:
        pod = workload.pod
        assert pod["automountServiceAccountToken"] is False
        account = manifests.get("ServiceAccount", workload.namespace, pod["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert {"type": "RuntimeDefault"} == pod["securityContext"]["seccompProfile"]
        for container in workload.all_containers():
            _assert_locked_down(workload, container)


def _assert_locked_down(workload: Workload, container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int)
    assert context["runAsUser"] >= UID_MIN
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert {"drop": ["ALL"]} == context["capabilities"]
    assert {"type": "RuntimeDefault"} == context["seccompProfile"]
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), container["name"]
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == TMP]
    volumes = {v["name"]: v for v in workload.pod["volumes"]}
    assert 1 == len(tmp)
    assert "emptyDir" in volumes[tmp[0]["name"]], "a writable emptyDir on /tmp"


@overlay_names
def test_each_deployment_has_its_own_service_account(overlays: dict[str, Manifests], overlay: str):
    """No two Deployments share a ServiceAccount, and none uses `default`."""
    accounts = [(w.namespace, w.pod["serviceAccountName"]) for w in overlays[overlay].workloads]
    assert len(set(accounts)) == len(accounts)
    assert all(name != "default" for _, name in accounts)


@overlay_names
def test_secret_volumes_are_read_only_files(overlays: dict[str, Manifests], overlay: str):
    """Secrets are mounted read-only, as files only the owner (and fsGroup) may read."""
    for workload in overlays[overlay].workloads:
        secret_volumes = {v["name"] for v in workload.pod["volumes"] if "secret" in v}
        for volume in workload.pod["volumes"]:
            if "secret" in volume:
                assert 0o400 == volume["secret"]["defaultMode"]
        for container in workload.all_containers():
            for mount in container.get("volumeMounts", []):
                if mount["name"] in secret_volumes:
                    assert mount["readOnly"] is True


@overlay_names
def test_probes_and_shutdown_fit_the_drain(overlays: dict[str, Manifests], overlay: str):
    """gRPC probes hit the health port; preStop + drain + what follows it fit the grace period."""
    manifests = overlays[overlay]
    for workload in manifests.workloads:
        for container in workload.containers:
            assert {"readinessProbe", "livenessProbe"} <= set(container)
            pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            env = manifests.config_env(workload.namespace, container)
            command = tuple(container["args"][:2])
            drain = 0.0
            if command in SERVICE_NAMES:
                side = "PCI" if command[0] == "pci" else "MERCHANT"
                drain = float(env.get(f"RELAY_{side}_DRAIN_SECONDS", DRAIN_DEFAULT_SECONDS))
                # After the drain, work still owed an answer gets its time: the gateway waits up
                # to the drain again, PciRelay lets a card already sent finish its Flex POST.
                drain += (
                    drain
                    if side == "MERCHANT"
                    else float(env.get("RELAY_FLEX_TIMEOUT_SECONDS", FLEX_TIMEOUT_DEFAULT_SECONDS))
                )
                _assert_grpc_probes(workload, container, env, side, SERVICE_NAMES[command])
            grace = workload.pod["terminationGracePeriodSeconds"]
            assert pre_stop + drain + PRE_STOP_MARGIN_SECONDS <= grace, workload.name


def _assert_grpc_probes(
    workload: Workload, container: dict[str, Any], env: dict[str, str], side: str, service: str
) -> None:
    health_port = int(env[f"RELAY_{side}_HEALTH_PORT"])
    assert health_port == workload.container_port("health")
    assert health_port != int(env[f"RELAY_{side}_PORT"])
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert health_port == container[kind]["grpc"]["port"], kind
    assert service == container["readinessProbe"]["grpc"]["service"]


@overlay_names
def test_pods_spread_across_zones(overlays: dict[str, Manifests], overlay: str):
    """Each Deployment spreads its own pods over topology.kubernetes.io/zone."""
    for workload in overlays[overlay].workloads:
        zone = [
            c
            for c in workload.pod["topologySpreadConstraints"]
            if c["topologyKey"] == "topology.kubernetes.io/zone"
        ]
        assert 1 == len(zone), workload.name
        assert labels_match(zone[0]["labelSelector"]["matchLabels"], workload.pod_labels)


def test_prod_spreads_strictly_and_runs_replicas(overlays: dict[str, Manifests]):
    """In prod both sides keep two replicas at least, never both in one zone."""
    manifests = overlays["prod"]
    for workload in manifests.workloads:
        [zone] = [
            c
            for c in workload.pod["topologySpreadConstraints"]
            if c["topologyKey"] == "topology.kubernetes.io/zone"
        ]
        assert "DoNotSchedule" == zone["whenUnsatisfiable"]
    for hpa in manifests.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= 2
