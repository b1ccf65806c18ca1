"""Typed views of the capture context and the transient token.

A CaptureContext exists only as what jose.verify_capture_context returns, and a TransientToken
only as what jose.verify_transient_token returns: holding one means its checks passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

CONTEXT_ISSUER = "Flex API"
TOKENS_PATH = "/flex/v2/tokens"
TOKEN_LIFETIME_SECONDS = 900


@dataclasses.dataclass(frozen=True, slots=True)
class CaptureContext:
    """A verified capture context: where to post the JWE, under which one-time key, with what."""

    raw: str = dataclasses.field(repr=False)
    kid: str
    jti: str
    issued_at: int
    expires_at: int
    origin: str
    path: str
    context_type: str
    one_time_kid: str
    one_time_jwk: Mapping[str, str] = dataclasses.field(repr=False)
    required_fields: tuple[str, ...]
    optional_fields: tuple[str, ...]

    @property
    def tokens_url(self) -> str:
        """Where the JWE goes: flx.origin + flx.path."""
        return self.origin + self.path


@dataclasses.dataclass(frozen=True, slots=True)
class TransientToken:
    """A verified transient token and the masked card facts Flex put in it."""

    raw: str = dataclasses.field(repr=False)
    jti: str
    kid: str
    issuer: str
    token_type: str
    issued_at: int
    expires_at: int
    masked_pan: str
    bin: str
    card_type: str
