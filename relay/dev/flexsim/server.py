"""Serve the simulator with uvicorn on a socket we bind ourselves.

Binding here lets us set TCP_NODELAY explicitly (a keep-alive socket without it can stall
about 40 ms per request) and learn the port before serving, which makes `--port 0` usable.
SIGTERM and SIGINT drain in-flight requests and return normally, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Generator

import uvicorn

from relay.dev.flexsim.app import FlexSimulator, build_app


class _Server(uvicorn.Server):
    """uvicorn's server with signal handling that ends in a clean return, not a re-raise."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._request_exit)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
                # The server has stopped and the process is on its way out: a signal now (a
                # supervisor asking twice) must not turn that clean exit into a kill.
                signal.signal(sig, signal.SIG_IGN)

    def _request_exit(self) -> None:
        self.force_exit = self.should_exit
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket with TCP_NODELAY set (inherited by accepted connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)  # noqa: FBT003
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # noqa: FBT003
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)  # noqa: FBT003
    return sock


async def serve(
    sim: FlexSimulator,
    sock: socket.socket,
    *,
    tls: tuple[str, str] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or should_exit), then drain and return."""
    config = uvicorn.Config(
        build_app(sim),
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():  # noqa: ASYNC110  uvicorn exposes a flag only
        await asyncio.sleep(0.01)
    if server.started and on_ready is not None:
        on_ready()
    await task
