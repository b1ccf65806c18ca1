"""Turn the pods of a rendered overlay into local processes, translating nothing by hand.

Each Deployment's pod becomes a directory per volume (Secret files written from the test
values at their item paths, mode 0400; emptyDir and PersistentVolumeClaim as empty
directories shared by the pod's containers) and one process per container, with:

- args as written (ENTRYPOINT is `relay`, so they run as `python -m relay.cli ARGS`);
- exactly the env Kubernetes would build from the container's ConfigMaps, with three
  translations, each of which fails on anything it cannot resolve:
  - an absolute path (also in `sqlite:////path`) under one of the container's volumeMounts is
    moved into that volume's directory; any other path is moved to where nothing exists (the
    image has no relay files), so a process that reads it fails as it would in the pod;
  - `NAME.NAMESPACE.svc.cluster.local:PORT` (or an http(s) URL of it) is followed Service ->
    selector -> Deployment -> container port and becomes `127.0.0.1:<that port's local port>`;
  - a `*_PORT` variable or `--port` flag must be a containerPort of the pod and becomes its
    local port; a `*_HOST` variable or `--host` flag must bind every interface (0.0.0.0: what a
    pod needs to be reachable through its Service) and becomes 127.0.0.1.

So a typo in a setting name, a mount path, a Secret key or a port is a ManifestError here, a
ConfigError when the settings load, or a failure of the boot itself.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import sys
from pathlib import Path

from tests.deploy.manifests import Doc, ManifestError, Manifests, Workload
from tests.deploy.secret_files import SecretKey

BIND_ALL = ("0.0.0.0", "::")  # noqa: S104  a pod must listen on its own address
SQLITE = "sqlite:///"
_ADDRESS = re.compile(
    r"(?P<scheme>https?://)?(?P<name>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc\.cluster\.local"
    r"(?::(?P<port>\d+))?"
)
_DEFAULT_PORTS = {"https://": 443, "http://": 80}
_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@dataclasses.dataclass
class LocalContainer:
    """One container of a pod, ready to run as `python -m relay.cli ARGS` with env."""

    workload: str
    name: str
    args: list[str]
    env: dict[str, str]
    probes: dict[str, Doc]
    manifest_args: list[str]
    """The args as the manifest writes them, before translation."""
    manifest_env: dict[str, str]
    """The env as Kubernetes builds it, before translation."""

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "relay.cli", *self.args]


@dataclasses.dataclass
class LocalPod:
    """A Deployment's pod: its init containers, run in order, then its containers."""

    workload: Workload
    init_containers: list[LocalContainer]
    containers: list[LocalContainer]


class LocalCluster:
    """The pods of one rendered overlay, laid out under root with loopback ports."""

    def __init__(
        self, manifests: Manifests, secrets: dict[SecretKey, dict[str, bytes]], root: Path
    ) -> None:
        """Allocate a free loopback port for every container port of every Deployment."""
        self.manifests = manifests
        self.secrets = secrets
        self.root = root
        keys = [
            (w.namespace, w.name, int(p["containerPort"]))
            for w in manifests.workloads
            for _, p in w.ports()
        ]
        self.ports = dict(zip(keys, _free_ports(len(keys)), strict=True))

    def local_port(self, workload: Workload, container_port: int) -> int:
        """The loopback port that stands for a container port of a Deployment's pods."""
        try:
            return self.ports[workload.namespace, workload.name, container_port]
        except KeyError:
            message = f"{workload.name} declares no container port {container_port}"
            raise ManifestError(message) from None

    def service_address(self, namespace: str, name: str, port: int) -> str:
        """Where a client of Service NAME:PORT ends up, on loopback."""
        workload, container_port = self.manifests.service_backend(namespace, name, port)
        return f"127.0.0.1:{self.local_port(workload, container_port)}"

    def pods(self) -> list[LocalPod]:
        """Every Deployment's pod, its volumes written out."""
        return [self.pod(workload) for workload in self.manifests.workloads]

    def pod(self, workload: Workload) -> LocalPod:
        """One Deployment's pod, its volumes written out."""
        volumes = self._volumes(workload)
        return LocalPod(
            workload,
            [self._container(workload, c, volumes) for c in workload.init_containers],
            [self._container(workload, c, volumes) for c in workload.containers],
        )

    def _volumes(self, workload: Workload) -> dict[str, Path]:
        found = {}
        for volume in workload.pod.get("volumes", []):
            directory = self.root / workload.namespace / workload.name / volume["name"]
            directory.mkdir(parents=True)
            if "secret" in volume:
                self._write_secret(workload, volume["secret"], directory)
            elif not ({"emptyDir", "persistentVolumeClaim"} & volume.keys()):
                raise ManifestError(f"{workload.name}: volume {volume['name']} is of no known type")
            found[volume["name"]] = directory
        return found

    def _write_secret(self, workload: Workload, source: Doc, directory: Path) -> None:
        name = source["secretName"]
        data = self.secrets.get((workload.namespace, name))
        if data is None:
            raise ManifestError(f"Secret {workload.namespace}/{name} is not one the README creates")
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] not in data:
                raise ManifestError(f"Secret {workload.namespace}/{name} has no key {item['key']}")
            path = directory / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            path.chmod(int(item.get("mode", source.get("defaultMode", 0o644))))

    def _container(
        self, workload: Workload, container: Doc, volumes: dict[str, Path]
    ) -> LocalContainer:
        where = f"{workload.name}/{container['name']}"
        if container.get("command", ["relay"]) != ["relay"]:
            raise ManifestError(f"{where}: command replaces the image's `relay` entrypoint")
        mounts = _mounts(where, container, volumes)
        rewrite = _Rewriter(self, workload, where, mounts)
        env = self.manifests.config_env(workload.namespace, container)
        args = [str(arg) for arg in container.get("args", [])]
        return LocalContainer(
            workload=workload.name,
            name=container["name"],
            args=[rewrite.arg(args[i - 1] if i else "", arg) for i, arg in enumerate(args)],
            env={name: rewrite.value(name, value) for name, value in env.items()},
            probes={
                kind: rewrite.probe(container, container[kind])
                for kind in _PROBES
                if kind in container
            },
            manifest_args=args,
            manifest_env=env,
        )


@dataclasses.dataclass
class _Rewriter:
    cluster: LocalCluster
    workload: Workload
    where: str
    mounts: list[tuple[str, Path]]

    def arg(self, previous: str, arg: str) -> str:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            return f"{flag}={self.value(flag, value)}"
        return self.value(previous if previous.startswith("--") else "", arg)

    def value(self, name: str, value: str) -> str:
        if name.endswith("_PORT") or name == "--port":
            return str(self._pod_port(name, value))
        if name.endswith("_HOST") or name == "--host":
            if value not in BIND_ALL:
                raise ManifestError(f"{self.where}: {name}={value} is unreachable in a pod")
            return "127.0.0.1"
        return self._path(name, _ADDRESS.sub(self._address, value))

    def probe(self, container: Doc, probe: Doc) -> Doc:
        kind = next((k for k in ("grpc", "tcpSocket", "httpGet") if k in probe), None)
        if kind is None:
            raise ManifestError(f"{self.where}: a probe other than grpc, tcpSocket or httpGet")
        target = probe[kind]["port"]
        numbers = [p["containerPort"] for p in container.get("ports", [])
                   if target in (p.get("name"), p["containerPort"])]  # fmt: skip
        if len(numbers) != 1:
            raise ManifestError(f"{self.where}: probe port {target} is no port of the container")
        port = self.cluster.local_port(self.workload, int(numbers[0]))
        return {kind: {**probe[kind], "port": port}}

    def _pod_port(self, name: str, value: str) -> int:
        if not value.isdigit():
            raise ManifestError(f"{self.where}: {name}={value} is not a port number")
        return self.cluster.local_port(self.workload, int(value))

    def _address(self, match: re.Match[str]) -> str:
        manifests = self.cluster.manifests
        manifests.get("Service", match["ns"], match["name"])  # a bare name must exist too
        if match["port"] is None and match["scheme"] is None:
            return match[0]  # a TLS server name, not an address
        port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[match["scheme"]]
        address = self.cluster.service_address(match["ns"], match["name"], port)
        return f"{match['scheme'] or ''}{address}"

    def _path(self, name: str, value: str) -> str:
        prefix, path = (SQLITE, value[len(SQLITE) :]) if value.startswith(SQLITE) else ("", value)
        if prefix and not path.startswith("/"):
            raise ManifestError(f"{self.where}: {name} is a relative SQLite path, on no volume")
        if not path.startswith("/"):
            return value
        for mount_path, directory in self.mounts:
            if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
                return prefix + str(directory / path[len(mount_path) :].lstrip("/"))
        # On no volume: the image's own filesystem, which holds no relay file. The setting
        # reads as a missing file, as it would in the pod, if the process reads it at all.
        return prefix + str(self.cluster.root / "image-filesystem" / path.lstrip("/"))


def _mounts(where: str, container: Doc, volumes: dict[str, Path]) -> list[tuple[str, Path]]:
    mounts = []
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in volumes:
            raise ManifestError(f"{where}: volumeMount {mount['name']} names no volume")
        mounts.append((mount["mountPath"], volumes[mount["name"]] / mount.get("subPath", "")))
    # The longest mount path first, as the kernel resolves nested mounts.
    return sorted(mounts, key=lambda item: len(item[0]), reverse=True)


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
