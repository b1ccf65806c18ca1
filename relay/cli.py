"""The `relay` command.

It knows neither side: subcommands come from the `relay.commands` entry-point group, so
merchant_side and pci_side add theirs without relay importing them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from relay.errors import ConfigError, RelayError

ENTRY_POINT_GROUP = "relay.commands"


def port_argument(text: str) -> int:
    """An argparse type for --port: a whole number from 0 (a free port) to 65535."""
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError("a port is a whole number from 0 to 65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered command group."""
    parser = argparse.ArgumentParser(prog="relay", description="Flex API v2 three-party relay")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry_point in sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
    ):
        entry_point.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; configuration errors print a message and exit 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)  # noqa: T201  the CLI's own error channel
        return 2
    except RelayError as exc:
        print(f"relay: {exc.message} ({exc.reason})", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
