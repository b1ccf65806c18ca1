"""Running a grpc.aio server the same way on both sides: TLS, health, reflection, drain.

On SIGTERM or SIGINT `Served.draining` is set (open streams stop taking new items and answer
them UNAVAILABLE "draining"), the health service turns NOT_SERVING (so load balancers stop
sending), then `server.stop(grace)` refuses new calls with UNAVAILABLE while in-flight calls
finish within the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import os
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from relay.cli import port_argument
from relay.config import ServerConfig
from relay.corelog import core_log_captured
from relay.errors import ConfigError
from relay.tlsfiles import check_ca_bundle, check_key_pair

# A gRPC message carries one capture context and ids; 1 MiB is ample and bounds memory.
MAX_MESSAGE_BYTES = 1024 * 1024

# grpc sets SO_REUSEPORT by default, so a second server on a port in use starts and silently
# takes a share of the connections. Ours must fail to bind instead.
NO_REUSEPORT = ("grpc.so_reuseport", 0)

_BIND_REASONS = {
    errno.EADDRINUSE: "the address is already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
}


def new_server() -> grpc.aio.Server:
    """A grpc.aio server with bounded message sizes and keepalive for long streams."""
    return grpc.aio.server(
        options=[
            NO_REUSEPORT,
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )


def server_credentials(
    config: ServerConfig, *, env_prefix: str = "RELAY_*"
) -> grpc.ServerCredentials | None:
    """Mutual TLS credentials from the config's files, or None for --insecure-dev.

    The files are parsed and the key matched to the certificate here, because grpc reports a
    bad file only as a port it cannot listen on. Messages name the variables as
    `{env_prefix}_TLS_KEY_FILE` and so on, with the file's base name.
    """
    if config.insecure_dev:
        if not _is_loopback(config.host):
            raise ConfigError(["--insecure-dev serves plaintext: it binds loopback addresses only"])
        return None
    files = (config.tls_cert_file, config.tls_key_file, config.client_ca_file)
    if None in files:
        raise ConfigError(["a TLS certificate, key and client CA are required (mutual TLS)"])
    cert, key, ca = (_read(path) for path in files)
    cert_name, key_name, ca_name = (
        f"{env_prefix}_{variable} ({Path(path or '').name})"
        for variable, path in zip(
            ("TLS_CERT_FILE", "TLS_KEY_FILE", "CLIENT_CA_FILE"), files, strict=True
        )
    )
    check_key_pair(cert, key, cert_name=cert_name, key_name=key_name)
    check_ca_bundle(ca, name=ca_name)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def bind_problem(host: str, port: int) -> str | None:
    """Why the OS would refuse a listener on host:port, or None if a plain socket can bind it.

    grpc says only "Failed to bind", so a plain socket is bound the way grpc binds its own
    (SO_REUSEADDR, no SO_REUSEPORT) to learn the errno. Like grpc, one resolved address that
    binds is enough.
    """
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return "the host name does not resolve"
    problems = [_probe(family, address) for family, _, _, _, address in resolved]
    if not problems or None in problems:
        return None
    return problems[0]


def _probe(family: socket.AddressFamily, address: tuple[Any, ...]) -> str | None:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return _BIND_REASONS.get(exc.errno or 0) or os.strerror(exc.errno or 0).lower()
    return None


def _listen(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    what: str,
) -> int:
    """Bind server to host:port, or raise ConfigError saying why the OS refused."""
    address = _address(host, port)
    # Probing first keeps the common refusals (a port in use) to our one line: grpc's own
    # failure also writes a C-core error line to stderr.
    problem = bind_problem(host, port)
    if problem is None:
        try:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
        except RuntimeError:
            # Lost a race for the port, or a refusal the probe cannot see.
            problem = bind_problem(host, port) or "grpc could not bind it"
    raise ConfigError([f"cannot listen on {address}{what}: {problem}"])


def _address(host: str, port: int) -> str:
    """host:port as grpc parses it: an IPv6 literal goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Served:
    """A started server: its port, its health servicer, and a way to wait for the signal."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health_aio.HealthServicer,
        health_server: grpc.aio.Server | None = None,
        health_port: int | None = None,
    ) -> None:
        """Use start_server."""
        self.server = server
        self.port = port
        self.health = health_servicer
        self.health_server = health_server
        self.health_port = health_port
        self.stopping = asyncio.Event()
        self.draining = asyncio.Event()
        """Set when the drain starts: services stop taking new work and answer it "draining"."""

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start the drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def drain(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within grace."""
        self.draining.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.close()

    async def close(self) -> None:
        """Stop both listeners at once (after drain, or when start-up is abandoned)."""
        await self.server.stop(None)
        if self.health_server is not None:
            await self.health_server.stop(None)


async def start_server(
    server: grpc.aio.Server,
    config: ServerConfig,
    service_names: Sequence[str],
    *,
    register: Callable[[grpc.aio.Server], None],
    env_prefix: str = "RELAY_*",
) -> Served:
    """Register services, health and reflection, bind, start, and report SERVING.

    env_prefix (RELAY_PCI, RELAY_MERCHANT) names the TLS file variables in error messages.
    """
    register(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    credentials = server_credentials(config, env_prefix=env_prefix)
    port = _listen(server, config.host, config.port, credentials, "")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    served = Served(server, port, health_servicer)
    if config.health_port is not None:
        try:
            await _start_health_listener(served, config.host, config.health_port)
        except ConfigError:
            await served.close()
            raise
    return served


async def _start_health_listener(served: Served, host: str, port: int) -> None:
    """Plaintext grpc.health.v1 only, sharing the servicer: drain shows there too.

    The kubelet's gRPC probes cannot do TLS, and the main port is mutual TLS only. This
    listener carries no business service and no reflection: it tells SERVING or NOT_SERVING.
    """
    health_server = grpc.aio.server(options=[NO_REUSEPORT])
    health_pb2_grpc.add_HealthServicer_to_server(served.health, health_server)
    served.health_port = _listen(health_server, host, port, None, " (health)")
    served.health_server = health_server
    await health_server.start()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | None) -> bytes:
    assert path is not None
    try:
        return Path(path).read_bytes()
    except OSError:
        raise ConfigError([f"cannot read TLS file {Path(path).name}"]) from None


def add_serve_arguments(serve: argparse.ArgumentParser, prefix: str, insecure_help: str) -> None:
    """--host, --port (overriding PREFIX_HOST/_PORT) and the explicit --insecure-dev flag."""
    serve.add_argument("--host", help=f"overrides {prefix}_HOST")
    serve.add_argument(
        "--port", type=port_argument, help=f"overrides {prefix}_PORT (0 picks a free port)"
    )
    serve.add_argument("--insecure-dev", action="store_true", help=insecure_help)


def with_overrides(config: ServerConfig, host: str | None, port: int | None) -> ServerConfig:
    """The config with --host/--port from the command line, where given."""
    return dataclasses.replace(
        config,
        host=host if host is not None else config.host,
        port=port if port is not None else config.port,
    )


async def serve_until_signal(
    running: contextlib.AbstractAsyncContextManager[Served],
    config: ServerConfig,
    name: str,
    env_prefix: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain; logs `<name>_listening` with the port.

    The TLS files are checked before `running` opens anything (a vault, a ledger), so a bad
    file is one message naming its variable, `{env_prefix}_TLS_KEY_FILE`; env_prefix defaults
    to RELAY_ and the upper-cased name, as `relay pci serve` and `relay merchant serve` read.
    gRPC C-core's own stderr lines become JSON events meanwhile (relay.corelog).
    """
    server_credentials(config, env_prefix=env_prefix or f"RELAY_{name.upper()}")
    with core_log_captured():
        await _serve(running, config, name)


async def _serve(
    running: contextlib.AbstractAsyncContextManager[Served], config: ServerConfig, name: str
) -> None:
    log = structlog.get_logger(name)
    event = {
        step: f"{name}_{step}" for step in ("insecure_dev", "listening", "draining", "stopped")
    }
    async with running as served:
        served.install_signal_handlers()
        if config.insecure_dev:
            log.warning(event["insecure_dev"], detail="plaintext gRPC; never outside loopback")
        log.info(
            event["listening"], host=config.host, port=served.port, health_port=served.health_port
        )
        await served.stopping.wait()
        log.info(event["draining"], grace_seconds=config.drain_seconds)
        await served.drain(config.drain_seconds)
    log.info(event["stopped"])
