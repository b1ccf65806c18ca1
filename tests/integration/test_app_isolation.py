"""Apps at the MerchantGateway: each is its certificate, its own request ids and its own limit.

Two apps of one merchant call one gateway over mTLS (tests/integration/merchant_rig.py); the
PCI side's audit log witnesses how many tokenizations really happened.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from merchant_side.cli import running
from merchant_side.identity import DEV_APP
from relay.client import MerchantClient, Request
from relay.config import MerchantConfig, PciClientConfig, ServerConfig
from relay.dev import tlsgen
from relay.errors import RateLimited, TokenNotFound
from relay.pb.v1 import merchant_gateway_pb2
from relay.secrets import Secret
from tests.integration import merchant_rig as rig_fixtures
from tests.integration.conftest import FlexSim
from tests.integration.merchant_rig import (
    APP,
    OTHER_APP,
    MakeMerchantRig,
    MerchantRig,
    closed_port,
)
from tests.integration.pci_rig import MERCHANT, NETWORK_CARDS, Rejection

merchant_pki, merchant_flexsim, make_merchant_rig, postgres_ledger_url = (
    rig_fixtures.merchant_pki,
    rig_fixtures.merchant_flexsim,
    rig_fixtures.make_merchant_rig,
    rig_fixtures.postgres_ledger_url,
)

VISA = next(card for card in NETWORK_CARDS if card.vector.network == "Visa")
SENT = [("started", ""), ("success", "")]
"""The audit outcomes of one tokenization."""


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Each ledger backend, fresh for the test."""
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    url: str = request.getfixturevalue("postgres_ledger_url")
    return url


async def rejection_of(call: Any) -> Rejection:
    """The failure of a raw gateway call, checked for test PANs."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return Rejection.of(info.value)


def get_token(rig: MerchantRig, request_id: str, **who: Any) -> Any:
    """A raw GetToken call as an app (app=...) or with a certificate (client=...)."""
    request = merchant_gateway_pb2.GetTokenRequest(request_id=request_id)
    return rig.stub(**who).GetToken(request, timeout=10)


def request_token(rig: MerchantRig, request_id: str, **who: Any) -> Any:
    """A raw RequestToken call for the Visa card."""
    request = merchant_gateway_pb2.TokenRequest(request_id=request_id, card_ref=VISA.card_ref)
    return rig.stub(**who).RequestToken(request, timeout=20)


# --- Separate requests and tokens ---------------------------------------------------------------


async def test_the_same_request_id_in_two_apps_is_two_tokenizations(
    make_merchant_rig: MakeMerchantRig, ledger_url: str
) -> None:
    """Each app gets its own token for the same request_id and card, and keeps getting it."""
    rig = await make_merchant_rig(ledger_url=ledger_url)
    other = await rig.app_client(OTHER_APP)
    mine = await rig.client.request_token("iso-1", VISA.card_ref, timeout=20)
    theirs = await other.request_token("iso-1", VISA.card_ref, timeout=20)
    assert mine.jti != theirs.jti
    assert SENT + SENT == await rig.audit_outcomes("iso-1")
    assert mine == await rig.client.request_token("iso-1", VISA.card_ref, timeout=20)
    assert mine == await rig.client.get_token("iso-1")
    assert theirs == await other.get_token("iso-1")
    assert SENT + SENT == await rig.audit_outcomes("iso-1")


async def test_another_apps_request_id_is_not_found_like_an_unknown_one(
    make_merchant_rig: MakeMerchantRig, ledger_url: str
) -> None:
    """GetToken of another app's live request answers exactly as one never asked."""
    rig = await make_merchant_rig(ledger_url=ledger_url)
    await rig.client.request_token("iso-2", VISA.card_ref, timeout=20)
    # The same request_id for both, so their statuses may be compared whole.
    theirs = await rejection_of(get_token(rig, "iso-2", app=OTHER_APP))
    await rig.client.get_token("iso-2")  # A's token is live
    unknown_rig = await make_merchant_rig(ledger_url="memory")
    unknown = await rejection_of(get_token(unknown_rig, "iso-2", app=OTHER_APP))
    assert (grpc.StatusCode.NOT_FOUND, "TOKEN_NOT_FOUND") == (theirs.code, theirs.reason)
    assert unknown == theirs
    other = await rig.app_client(OTHER_APP)
    with pytest.raises(TokenNotFound):
        await other.get_token("iso-2")


async def test_another_apps_request_id_tokenizes_anew(
    make_merchant_rig: MakeMerchantRig, ledger_url: str
) -> None:
    """RequestToken with another app's request_id and card_ref never returns that app's token."""
    rig = await make_merchant_rig(ledger_url=ledger_url)
    mine = await rig.client.request_token("iso-3", VISA.card_ref, timeout=20)
    answer = await request_token(rig, "iso-3", app=OTHER_APP)
    assert answer.token.jti != mine.jti
    assert answer.token.transient_token != mine.transient_token
    assert SENT + SENT == await rig.audit_outcomes("iso-3")
    assert mine == await rig.client.get_token("iso-3")


async def test_the_receipt_names_the_calling_app_and_is_replayed(
    make_merchant_rig: MakeMerchantRig, ledger_url: str
) -> None:
    """PciRelay's receipt reaches each app unchanged, naming that app, also from the ledger."""
    rig = await make_merchant_rig(ledger_url=ledger_url)
    assert rig.pci is not None
    key = rig.pci.receipt_public_key
    other = await rig.app_client(OTHER_APP)
    for client, app in ((rig.client, APP), (other, OTHER_APP)):
        token = await client.request_token("iso-receipt", VISA.card_ref, timeout=20)
        receipt = token.verify_receipt(key)
        assert (app, "iso-receipt", token.jti) == (receipt.app, receipt.request_id, receipt.tt_jti)
        assert token.receipt == (await client.get_token("iso-receipt")).receipt


# --- Identity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "certificate",
    ["merchant", "bad_app_id"],
    ids=["merchant_uri_with_the_apps_cn", "app_uri_breaking_the_id_rules"],
)
async def test_a_certificate_naming_no_app_is_refused(
    make_merchant_rig: MakeMerchantRig, certificate: str
) -> None:
    """A client certificate of the apps' CA without a valid app SAN URI names no app."""
    rig = await make_merchant_rig()
    await rig.client.request_token("iso-4", VISA.card_ref, timeout=20)
    if certificate == "merchant":
        client = tlsgen.issue_client(rig.pki.ca, APP)  # CN = the app's id, URI = a merchant
    else:
        client = tlsgen.issue_app(rig.pki.ca, f"{APP} drop")
    calls = [
        get_token(rig, "iso-4", client=client),
        request_token(rig, "iso-4", client=client),
        rig.stub(client=client).CreateSession(
            merchant_gateway_pb2.CreateSessionRequest(), timeout=10
        ),
    ]
    for call in calls:
        rejection = await rejection_of(call)
        assert (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED") == (
            rejection.code,
            rejection.reason,
        )
    assert SENT == await rig.audit_outcomes("iso-4")


async def test_a_merchants_certificate_is_not_an_app(make_merchant_rig: MakeMerchantRig) -> None:
    """The merchant's own certificate (the one PciRelay trusts) names no app at the gateway."""
    rig = await make_merchant_rig()
    rejection = await rejection_of(get_token(rig, "iso-5", client=rig.pki.client(MERCHANT)))
    assert grpc.StatusCode.PERMISSION_DENIED == rejection.code


async def test_under_insecure_dev_every_caller_is_the_dev_app(merchant_flexsim: FlexSim) -> None:
    """Plaintext carries no certificate: calls are DEV_APP's, with DEV_APP's one rate limit."""
    with closed_port() as nowhere:
        config = MerchantConfig(
            server=ServerConfig(host="127.0.0.1", port=0, insecure_dev=True),
            flex=merchant_flexsim.config(),
            pci=PciClientConfig(target=nowhere, insecure_dev=True),
            ledger_url=Secret("memory"),
            app_rate=0.001,
            app_burst=1,
        )
        async with running(config) as served:
            async with MerchantClient.insecure(f"127.0.0.1:{served.port}") as dev:
                with pytest.raises(TokenNotFound):
                    await dev.get_token("dev-1")
            async with MerchantClient.insecure(f"127.0.0.1:{served.port}") as again:
                with pytest.raises(RateLimited) as info:
                    await again.get_token("dev-1")
    assert {"merchant": DEV_APP} == info.value.ids


# --- The per-app rate limit ---------------------------------------------------------------------


async def test_an_app_over_its_burst_is_rate_limited_and_another_is_not(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """Burst 2 at a rate that refills nothing during the test: the third call is refused."""
    rig = await make_merchant_rig(app_rate=0.001, app_burst=2)
    for _ in range(2):
        assert grpc.StatusCode.NOT_FOUND == (await rejection_of(get_token(rig, "rl-1"))).code
    for call in (get_token(rig, "rl-1"), request_token(rig, "rl-1")):
        rejection = await rejection_of(call)
        assert (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED") == (
            rejection.code,
            rejection.reason,
        )
    assert [] == await rig.audit_outcomes("rl-1")
    other = await rig.app_client(OTHER_APP)
    with pytest.raises(TokenNotFound):
        await other.get_token("rl-1")
    token = await other.request_token("rl-1", VISA.card_ref, timeout=20)
    assert SENT == await rig.audit_outcomes("rl-1")
    assert token.jti


async def test_each_item_of_a_stream_counts_against_the_limit(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """A RequestTokens stream is no way around the limit: items past the burst are refused."""
    rig = await make_merchant_rig(app_rate=0.001, app_burst=2)
    requests = [Request(f"rl-stream-{index}", VISA.card_ref) for index in range(4)]
    outcomes = [outcome async for outcome in rig.client.request_tokens(requests, timeout=30)]
    limited = [outcome for outcome in outcomes if isinstance(outcome.error, RateLimited)]
    tokens = [outcome for outcome in outcomes if outcome.token is not None]
    assert (2, 2) == (len(tokens), len(limited))
    with pytest.raises(RateLimited):
        await rig.client.get_token("rl-stream-0")
