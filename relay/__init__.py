"""Shared core of the Flex API v2 relay: card types, errors, the Flex client and simulator."""

__all__: list[str] = []
