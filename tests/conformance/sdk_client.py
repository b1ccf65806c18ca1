"""Drive the official Cybersource Python SDK against a Flex API v2 endpoint.

Run it with the python of the SDK's own virtualenv (``.venv-sdk``), never from the project venv,
and never import it from pytest:

    sdk_client.py HOST:PORT MERCHANT_ID KEY_ID SHARED_SECRET_B64 CA_CERT_PEM

It creates a capture context with ``FlexAPIApi.generate_flex_api_capture_context`` (HTTP
Signature auth), then has ``parse_capture_context_response`` verify it through
``GET /flex/v2/public-keys/{kid}``. It prints exactly one JSON line on stdout and exits 0 only
if both steps succeed.

Trust: the SDK builds both of its urllib3 pool managers (``CyberSource/rest.py`` for the API
call and ``CyberSource/utilities/flex/PublicKeyApiController.py`` for the key fetch) with
``ca_certs=certifi.where()``, called at request time, and it has no CA option of its own
(``ssl_verify`` can only switch verification off). So this process points ``certifi.where`` at
the test CA: nothing on disk changes, and the SDK trusts that CA and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import certifi

SESSION_FIELDS = {
    "fields": {
        "paymentInformation": {
            "card": {
                "number": {},
                "securityCode": {"required": False},
                "expirationMonth": {"required": False},
                "expirationYear": {"required": False},
                "type": {"required": False},
            }
        }
    }
}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host", help="HOST:PORT of the Flex endpoint (no scheme; https is implied)")
    parser.add_argument("merchant_id")
    parser.add_argument("key_id")
    parser.add_argument("shared_secret", help="the shared secret, base64 as Cybersource issues it")
    parser.add_argument("ca_cert", help="PEM file of the CA that signed the endpoint's certificate")
    return parser.parse_args(argv)


def _trust_only(ca_cert: str) -> None:
    path = str(Path(ca_cert).resolve(strict=True))
    certifi.where = lambda: path


def _merchant_config(args: argparse.Namespace) -> dict[str, str]:
    # Only strings: with logging off, MerchantConfiguration.validate_merchant_details runs
    # ast.literal_eval(json.dumps(config)), which fails on a LogConfiguration object
    # ("not JSON serializable") and on any bool (JSON "false" is no Python literal). Leaving
    # "log_config" out keeps the SDK's default LogConfiguration, which has logging off.
    return {
        "authentication_type": "http_signature",
        "merchantid": args.merchant_id,
        "run_environment": args.host,
        "merchant_keyid": args.key_id,
        "merchant_secretkey": args.shared_secret,
        "enable_log": "false",
    }


def _error_text(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    text = f"{type(exc).__name__}: {exc}".strip()
    if status is not None and str(status) not in text:
        text = f"{text} (status {status})"
    original = getattr(exc, "original_error", None)
    if original is not None:
        text = f"{text}; caused by {type(original).__name__}: {original}"
    elif exc.__cause__ is not None:
        text = f"{text}; caused by {type(exc.__cause__).__name__}: {exc.__cause__}"
    return text


def run(args: argparse.Namespace, outcome: dict[str, Any]) -> bool:
    """Create and verify one capture context, filling outcome; True only if both steps pass."""
    from authenticationsdk.util.jwt.JWTUtility import parse  # noqa: PLC0415
    from CyberSource import FlexAPIApi  # noqa: PLC0415
    from CyberSource.rest import ApiException  # noqa: PLC0415
    from CyberSource.utilities.flex.CaptureContextParsingUtility import (  # noqa: PLC0415
        parse_capture_context_response,
    )

    _trust_only(args.ca_cert)
    api = FlexAPIApi(_merchant_config(args))

    outcome["stage"] = "sessions"
    try:
        jwt_value, status, _raw = api.generate_flex_api_capture_context(json.dumps(SESSION_FIELDS))
    except ApiException as exc:
        outcome["status"] = exc.status or None
        outcome["error"] = f"ApiException ({exc.status}): {exc.reason}"
        outcome["error_body"] = exc.body
        return False
    outcome["status"] = status
    outcome["content_type"] = api.api_client.last_response.getheader("Content-Type")
    outcome["jwt_type"] = type(jwt_value).__name__

    parsed = parse(jwt_value)
    outcome["kid"] = parsed["header"].get("kid")
    outcome["alg"] = parsed["header"].get("alg")
    outcome["jti"] = parsed["payload"].get("jti")

    outcome["stage"] = "public-keys"
    payload = parse_capture_context_response(jwt_value, api.api_client.mconfig)
    outcome["verified"] = True
    outcome["iss"] = payload.get("iss")
    ctx = (payload.get("ctx") or [{}])[0]
    outcome["ctx_type"] = ctx.get("type")
    outcome["required_fields"] = sorted(ctx.get("data", {}).get("requiredFields", []))
    outcome["optional_fields"] = sorted(ctx.get("data", {}).get("optionalFields", []))
    outcome["flx_path"] = payload.get("flx", {}).get("path")
    outcome["stage"] = "done"
    return status == 201


def main(argv: list[str] | None = None) -> int:
    """Run the SDK once and print the outcome as one JSON line."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    outcome: dict[str, Any] = {
        "status": None,
        "kid": None,
        "jti": None,
        "verified": False,
        "error": None,
    }
    ok = False
    # The SDK may print; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            ok = run(args, outcome)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the JSON outcome
            outcome["error"] = _error_text(exc)
    sys.stdout.write(json.dumps(outcome, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
