"""The official Cybersource Python SDK, unmodified, against the Flex simulator over HTTPS."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.conformance

CARD = "paymentInformation.card."
OPTIONAL = sorted(
    CARD + name for name in ("securityCode", "expirationMonth", "expirationYear", "type")
)


def test_sdk_creates_and_verifies_a_capture_context(simulator, run_sdk):
    """The SDK's signed session call gets a 201 JWT that its parsing utility verifies."""
    result = run_sdk(simulator)

    out = result.outcome
    assert result.returncode == 0, out
    assert out["error"] is None
    assert out["status"] == 201
    assert out["jwt_type"] == "str"
    assert out["content_type"].split(";")[0].strip() == "application/jwt"
    assert out["alg"] == "RS256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", out["kid"])
    assert re.fullmatch(r"[A-Za-z0-9]{16}", out["jti"])
    assert out["verified"] is True
    assert out["iss"] == "Flex API"
    assert out["ctx_type"] == "api-0.1.0"
    assert out["flx_path"] == "/flex/v2/tokens"
    assert out["required_fields"] == [CARD + "number"]
    assert out["optional_fields"] == OPTIONAL


def test_sdk_gets_a_fresh_context_each_session(simulator, run_sdk):
    """Two SDK sessions get different jti values under the same long-term kid."""
    first, second = run_sdk(simulator).outcome, run_sdk(simulator).outcome

    assert first["verified"] is True, first
    assert second["verified"] is True, second
    assert first["kid"] == second["kid"]
    assert first["jti"] != second["jti"]


def test_sdk_reaches_the_simulator_by_localhost_name(simulator, run_sdk):
    """The SDK signs and fetches keys through the host name it is configured with."""
    result = run_sdk(simulator, host=f"localhost:{simulator.port}")

    assert result.returncode == 0, result.outcome
    assert result.outcome["verified"] is True


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"shared_secret": "c2VjcmV0LXRoYXQtaXMtbm90LXRoZS1vbmU="}, id="wrong-secret"),
        pytest.param({"merchant_id": "unknown_merchant"}, id="unknown-merchant"),
        pytest.param({"key_id": "00000000-0000-4000-8000-000000000000"}, id="unknown-key-id"),
    ],
)
def test_sdk_gets_401_with_bad_credentials(simulator, run_sdk, override):
    """A request the simulator cannot authenticate fails in the SDK with the gateway's 401."""
    result = run_sdk(simulator, **override)

    out = result.outcome
    assert result.returncode == 1, out
    assert out["stage"] == "sessions"
    assert out["status"] == 401
    assert out["verified"] is False
    assert out["kid"] is None
    body = json.loads(out["error_body"])
    assert set(body) == {"response"}
    assert isinstance(body["response"]["rmsg"], str)
    assert body["response"]["rmsg"]
