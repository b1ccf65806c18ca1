"""The rendered overlays as Python objects, and the lookups the tests make in them.

An overlay is rendered with the kubectl of `.venv-deploy` (`make deploy-venv` makes it on a
fresh machine, as `make deploy-check` does), and its YAML is read by that virtualenv's PyYAML:
the project's own `.venv` carries neither. Nothing rendered is committed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod")
DEPLOY_BIN = ROOT / ".venv-deploy" / "bin"
SERVICE_HOST = re.compile(r"(?P<name>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local")

# Read the rendered YAML with the deploy virtualenv's PyYAML and hand it over as JSON.
_YAML_TO_JSON = (
    "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"
)

Doc = dict[str, Any]


class ManifestError(Exception):
    """The manifests do not resolve: a reference names nothing, or something ambiguous."""


@functools.cache
def deploy_tools() -> Path:
    """The bin directory of .venv-deploy, made first if needed (an up-to-date one is kept)."""
    subprocess.run(
        ["make", "--no-print-directory", "-s", "deploy-venv"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return DEPLOY_BIN


def render(overlay: str) -> str:
    """`kubectl kustomize deploy/overlays/OVERLAY`: the YAML that `kubectl apply -k` sends."""
    result = subprocess.run(
        [str(deploy_tools() / "kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def parse(text: str) -> Manifests:
    """The documents of a rendered overlay."""
    result = subprocess.run(
        [str(deploy_tools() / "python"), "-c", _YAML_TO_JSON],
        input=text,
        check=True,
        capture_output=True,
        text=True,
    )
    return Manifests(json.loads(result.stdout))


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether every key of a matchLabels selector has the same value in labels."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@dataclasses.dataclass(frozen=True)
class Workload:
    """A Deployment and the pod it stamps out."""

    doc: Doc

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.doc["metadata"]["namespace"])

    @property
    def pod(self) -> Doc:
        return dict(self.doc["spec"]["template"]["spec"])

    @property
    def pod_labels(self) -> dict[str, str]:
        return dict(self.doc["spec"]["template"]["metadata"].get("labels", {}))

    @property
    def containers(self) -> list[Doc]:
        return list(self.pod["containers"])

    @property
    def init_containers(self) -> list[Doc]:
        return list(self.pod.get("initContainers", []))

    def all_containers(self) -> list[Doc]:
        return [*self.init_containers, *self.containers]

    def ports(self) -> Iterator[tuple[Doc, Doc]]:
        """(container, port) for each container port of the pod."""
        for container in self.containers:
            for port in container.get("ports", []):
                yield container, port

    def container_port(self, target: str | int) -> int:
        """The containerPort a Service targetPort or probe port means, by name or number."""
        found = [
            int(port["containerPort"])
            for _, port in self.ports()
            if target in (port.get("name"), port["containerPort"])
        ]
        if len(found) != 1:
            raise ManifestError(f"{self.name} has no single container port {target!r}")
        return found[0]


class Manifests:
    """Every document of one rendered overlay, indexed by kind."""

    def __init__(self, docs: list[Doc]) -> None:
        self.docs = docs

    def of_kind(self, kind: str) -> list[Doc]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def get(self, kind: str, namespace: str, name: str) -> Doc:
        found = [
            doc
            for doc in self.of_kind(kind)
            if doc["metadata"]["name"] == name and doc["metadata"].get("namespace") == namespace
        ]
        if len(found) != 1:
            raise ManifestError(f"no {kind} {namespace}/{name}")
        return found[0]

    @property
    def workloads(self) -> list[Workload]:
        return [Workload(doc) for doc in self.of_kind("Deployment")]

    def workload(self, namespace: str, name: str) -> Workload:
        return Workload(self.get("Deployment", namespace, name))

    def selected(self, namespace: str, selector: Mapping[str, str]) -> list[Workload]:
        """The Deployments in namespace whose pods a matchLabels selector picks."""
        return [
            w
            for w in self.workloads
            if w.namespace == namespace and labels_match(selector, w.pod_labels)
        ]

    def service_backend(self, namespace: str, name: str, port: int) -> tuple[Workload, int]:
        """Follow Service -> selector -> Deployment -> container port: what a client reaches."""
        service = self.get("Service", namespace, name)
        ports = [p for p in service["spec"]["ports"] if int(p["port"]) == port]
        if len(ports) != 1:
            raise ManifestError(f"Service {namespace}/{name} has no port {port}")
        workloads = self.selected(namespace, service["spec"].get("selector", {}))
        if len(workloads) != 1:
            raise ManifestError(f"Service {namespace}/{name} selects {len(workloads)} Deployments")
        target = ports[0].get("targetPort", port)
        return workloads[0], workloads[0].container_port(target)

    def service_names_of(self, workload: Workload) -> list[str]:
        """The cluster DNS names of the Services that select a Deployment's pods."""
        return [
            f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc.cluster.local"
            for s in self.of_kind("Service")
            if s["metadata"]["namespace"] == workload.namespace
            and labels_match(s["spec"].get("selector", {}), workload.pod_labels)
        ]

    def config_env(self, namespace: str, container: Doc) -> dict[str, str]:
        """A container's environment as Kubernetes builds it from ConfigMaps and values."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" not in source:
                raise ManifestError(f"{container['name']}: envFrom other than a ConfigMap")
            config = self.get("ConfigMap", namespace, source["configMapRef"]["name"])
            env.update({str(k): str(v) for k, v in config.get("data", {}).items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            ref = item.get("valueFrom", {}).get("configMapKeyRef")
            if ref is None:
                raise ManifestError(f"{container['name']}: env {item['name']} not from a ConfigMap")
            data = self.get("ConfigMap", namespace, ref["name"]).get("data", {})
            if ref["key"] not in data:
                raise ManifestError(f"ConfigMap {ref['name']} has no key {ref['key']}")
            env[item["name"]] = str(data[ref["key"]])
        return env
