"""The gateway never sends a capture context PciRelay will not release a card under again.

PciRelay releases one card per capture context. When its answer says the context is spent,
used by another request (CAPTURE_CONTEXT_REUSED) or its attempt failed at Flex
(FLEX_UNAVAILABLE), the gateway's next try takes a new session instead of repeating it.

The gateway here is the real one (merchant_side.gateway.Gateway) over the rig's real PciRelay;
only the link between them is wrapped, to act out what PciRelay and a thief would do at the
right moment: the thief really does use the gateway's context at PciRelay first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from merchant_side.gateway import Gateway, TokenRequest
from merchant_side.ledger import MemoryLedger
from merchant_side.pci_client import PciClient, PciLink, PciToken, open_channel
from pci_side.vault import AuditEntry
from relay.dev.flexsim import jwt
from relay.errors import FlexUnavailable, RelayError
from relay.flex.client import FlexClient, new_http_client
from tests.integration import merchant_rig as rig_fixtures
from tests.integration.merchant_rig import MerchantRig
from tests.integration.pci_rig import NETWORK_CARDS

merchant_pki, merchant_flexsim, make_merchant_rig = (
    rig_fixtures.merchant_pki,
    rig_fixtures.merchant_flexsim,
    rig_fixtures.make_merchant_rig,
)

VISA = NETWORK_CARDS[0]
APP_ID = "app-reuse"


@dataclasses.dataclass
class Sent:
    """One call on the link: the context's jti and whether it was flagged a repeat."""

    cc_jti: str
    repeat: bool


class ActedLink:
    """The real link to PciRelay, with something happening before the first call goes out."""

    def __init__(self, real: PciLink, before_first: str) -> None:
        self._real = real
        self._before_first = before_first
        self.sent: list[Sent] = []

    async def tokenize(  # noqa: PLR0913  the PciLink signature
        self,
        app_id: str,
        request_id: str,
        capture_context: str,
        card_ref: str,
        *,
        timeout: float,
        repeat: bool = False,
    ) -> PciToken:
        self.sent.append(Sent(str(jwt.json_part(capture_context.split(".")[1])["jti"]), repeat))
        if len(self.sent) == 1 and self._before_first == "thief":
            # Someone holding the context tokenizes with it first, under a request of theirs.
            await self._real.tokenize(
                "thief", "stolen-" + request_id, capture_context, card_ref, timeout=timeout
            )
        if len(self.sent) == 1 and self._before_first == "flex-failed":
            # PciRelay's answer when the card went to Flex and Flex failed.
            raise FlexUnavailable("flex is unavailable", request_id=request_id)
        return await self._real.tokenize(
            app_id, request_id, capture_context, card_ref, timeout=timeout, repeat=repeat
        )

    def withdraw(self, app_id: str, request_id: str) -> None:
        self._real.withdraw(app_id, request_id)


@pytest.fixture
async def rig(make_merchant_rig) -> MerchantRig:
    return await make_merchant_rig()


@pytest.fixture
async def gateway_and_link(rig: MerchantRig) -> AsyncIterator[tuple[Gateway, PciClient]]:
    """A Gateway with the rig gateway's settings, and its real PciRelay client."""
    config = rig.gateway.config
    async with new_http_client(config.flex) as http, open_channel(config.pci) as channel:
        yield (
            Gateway(FlexClient(http, config.flex), MemoryLedger(), config),
            PciClient(channel, config.pci),
        )


@pytest.mark.parametrize("before_first", ["thief", "flex-failed"])
async def test_a_spent_context_costs_a_new_session_not_a_repeat(
    rig: MerchantRig, gateway_and_link: tuple[Gateway, PciClient], before_first: str
):
    """The first context is answered as spent; the token comes under a second one, once."""
    gateway, real = gateway_and_link
    link = ActedLink(real, before_first)
    request = TokenRequest("r-spent", VISA.card_ref, app_id=APP_ID)
    try:
        record = await gateway.request_token(request, link, deadline=20)
    except RelayError as exc:  # pragma: no cover - the failure this test exists to show
        pytest.fail(f"no token: {exc.reason}")
    assert 2 == len(link.sent)
    first, second = link.sent
    assert first.cc_jti != second.cc_jti
    assert not second.repeat
    successes = [e for e in await _audit(rig) if e.outcome == "success"]
    ours = [e for e in successes if e.request_id == request.request_id]
    assert [(second.cc_jti, record.jti)] == [(e.cc_jti, e.tt_jti) for e in ours]


async def _audit(rig: MerchantRig) -> list[AuditEntry]:
    return [stored.entry for stored in await rig.vault.audit_entries(limit=100)]
