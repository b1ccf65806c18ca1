"""`relay flexsim serve`: run the simulator as a process, as the contract in DESIGN.md says."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from pathlib import Path

import structlog

from relay.cli import port_argument
from relay.dev.flexsim.app import FlexSimulator
from relay.dev.flexsim.auth import MerchantKey
from relay.dev.flexsim.faults import Faults
from relay.dev.flexsim.server import bind, serve
from relay.errors import ConfigError
from relay.flex.signing import decode_shared_secret
from relay.logging import configure_logging
from relay.secrets import Secret


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flexsim serve` to the relay command."""
    flexsim = commands.add_parser("flexsim", help="the embedded Flex API v2 simulator")
    actions = flexsim.add_subparsers(dest="action", required=True)
    run = actions.add_parser("serve", help="serve the simulator until SIGTERM")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=port_argument, default=8443, help="0 picks a free port")
    run.add_argument("--merchant-id", required=True)
    run.add_argument("--key-id", required=True)
    secret = run.add_mutually_exclusive_group(required=True)
    secret.add_argument("--shared-secret", metavar="B64", help="the base64 shared secret")
    secret.add_argument("--shared-secret-file", type=Path, help="a file holding it")
    run.add_argument("--context-ttl", type=_positive, default=900, metavar="SECONDS")
    run.add_argument("--tls-cert", type=Path, metavar="PEM")
    run.add_argument("--tls-key", type=Path, metavar="PEM")
    run.add_argument("--origin", help="flx.origin to put in contexts (default: as requested)")
    run.add_argument("--pool-size", type=_positive, default=32, help="one-time keys kept ready")
    run.add_argument("--fault-latency-ms", type=float, default=0.0)
    run.add_argument("--fault-error-rate", type=float, default=0.0, help="share answered 503")
    run.add_argument("--fault-throttle-rate", type=float, default=0.0, help="share answered 429")
    run.add_argument("--fault-drop-rate", type=float, default=0.0, help="share dropped")
    run.add_argument("--fault-paths", default="sessions,tokens,public-keys")
    run.add_argument(
        "--fault-hold-after-issue-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="hold each tokens response this long after the token is issued and logged",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=_serve)


def _check_tls(cert: str, key: str) -> None:
    """Load the pair once up front, so a bad file is a message before the port is bound."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError):
        raise ConfigError(["--tls-cert/--tls-key cannot be loaded as a PEM pair"]) from None


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError("must be a whole number above 0")
    return int(text)


def _serve(args: argparse.Namespace) -> int:
    configure_logging(level=args.log_level)
    sim = FlexSimulator(
        [MerchantKey(args.merchant_id, args.key_id, _secret(args))],
        context_ttl=args.context_ttl,
        origin=args.origin,
        pool_size=args.pool_size,
        faults=_faults(args),
    )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError(["--tls-cert and --tls-key go together"])
    tls = (str(args.tls_cert), str(args.tls_key)) if args.tls_cert else None
    if tls is not None:
        _check_tls(*tls)
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise ConfigError([f"cannot listen on {args.host}:{args.port}: {exc.strerror}"]) from None
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    log = structlog.get_logger("relay.dev.flexsim")

    def ready() -> None:
        log.info(
            "flexsim_listening", url=f"{scheme}://{host}:{port}", kid=sim.long_term.current.kid
        )

    asyncio.run(serve(sim, sock, tls=tls, on_ready=ready))
    log.info("flexsim_stopped", sessions=sim.stats.sessions, tokens=sim.stats.tokens)
    return 0


def _secret(args: argparse.Namespace) -> Secret[bytes]:
    text = args.shared_secret
    if args.shared_secret_file is not None:
        try:
            text = args.shared_secret_file.read_text(encoding="utf-8")
        except OSError:
            raise ConfigError(["--shared-secret-file cannot be read"]) from None
    try:
        return decode_shared_secret(text)
    except ValueError:
        source = "--shared-secret-file" if args.shared_secret_file else "--shared-secret"
        raise ConfigError([f"{source} is not valid base64"]) from None


def _faults(args: argparse.Namespace) -> Faults:
    problems = [
        f"--fault-{name}-rate must be between 0 and 1"
        for name in ("error", "throttle", "drop")
        if not 0.0 <= getattr(args, f"fault_{name}_rate") <= 1.0
    ]
    problems += [
        f"--fault-{name}-ms must be between 0 and 600000"
        for name in ("latency", "hold-after-issue")
        if not 0.0 <= getattr(args, f"fault_{name.replace('-', '_')}_ms") <= 600_000
    ]
    paths = frozenset(p.strip() for p in args.fault_paths.split(",") if p.strip())
    if not paths <= {"sessions", "tokens", "public-keys"}:
        problems.append("--fault-paths takes sessions, tokens and public-keys")
    if args.fault_hold_after_issue_ms > 0 and "tokens" not in paths:
        problems.append("--fault-hold-after-issue-ms acts on tokens: keep it in --fault-paths")
    if problems:
        raise ConfigError(problems)
    return Faults(
        latency=args.fault_latency_ms / 1000,
        error_rate=args.fault_error_rate,
        throttle_rate=args.fault_throttle_rate,
        drop_rate=args.fault_drop_rate,
        hold_after_issue=args.fault_hold_after_issue_ms / 1000,
        paths=paths,
    )
