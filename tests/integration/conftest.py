"""Live simulators on loopback and Flex clients pointed at them; nothing here is mocked.

`relay flexsim serve` runs as a child process on port 0; its JSON log lines are drained in
background threads, the `flexsim_listening` line gives the URL, and teardown stops it with
SIGTERM, expects exit code 0 and scans everything it wrote for the test PANs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import wsgiref.handlers
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import httpx
import pytest

from relay.cards import CardData, Pan, SecurityCode
from relay.config import FlexConfig, FlexCredentials
from relay.flex.client import FlexClient, new_http_client
from relay.secrets import Secret
from tests.cards_testdata import assert_no_test_pans

MERCHANT_ID = "relay_it_merchant"
KEY_ID = "6d75ffad-ed36-4a6d-85af-5609185494f4"
SECRET = b"integration-test shared secret, 32+ bytes long"
SECRET_B64 = base64.b64encode(SECRET).decode("ascii")
CONTEXT_TTL = 600
"""The shared simulator's context lifetime: not Flex's 900, so a test can tell them apart."""
STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 10.0
SESSIONS_PATH = "/flex/v2/sessions"
TOKENS_PATH = "/flex/v2/tokens"


def relay_command(*args: str) -> list[str]:
    """`relay ARGS` run by the interpreter running the tests."""
    return [sys.executable, "-m", "relay.cli", *args]


def serve_command(*extra: str, shared_secret: str = SECRET_B64) -> list[str]:
    """`relay flexsim serve` on a free loopback port with the test credentials."""
    return relay_command(
        "flexsim",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--merchant-id",
        MERCHANT_ID,
        "--key-id",
        KEY_ID,
        "--shared-secret",
        shared_secret,
        *extra,
    )


class FlexSim:
    """A running `relay flexsim serve` child process and what it has written so far."""

    def __init__(self, extra: tuple[str, ...]) -> None:
        """Start the process and drain both pipes in background threads."""
        self.merchant_id = MERCHANT_ID
        self.key_id = KEY_ID
        self.secret_b64 = SECRET_B64
        self.secret = SECRET
        self.url = ""
        self.kid = ""
        self.returncode: int | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.process = subprocess.Popen(
            serve_command(*extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._drains = [
            threading.Thread(target=self._drain, args=(pipe,), daemon=True)
            for pipe in (self.process.stdout, self.process.stderr)
        ]
        for thread in self._drains:
            thread.start()

    @property
    def host(self) -> str:
        """host:port, as the Host header and the signing string carry it."""
        return urllib.parse.urlsplit(self.url).netloc

    @property
    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return "".join(self.lines)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines whose event is name."""
        found = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def wait_listening(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until the `flexsim_listening` line arrives; fail if the process dies first."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"flexsim did not start; it wrote:\n{self.output}", pytrace=False)
        record = self.events("flexsim_listening")[0]
        self.url, self.kid = record["url"], record["kid"]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal the process (once), wait for it, close its pipes; return its exit code."""
        if self.returncode is None:
            if self.process.poll() is None:
                self.process.send_signal(sig)
            try:
                self.returncode = self.process.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.returncode = -9
            for thread in self._drains:
                thread.join(5)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
        return self.returncode

    def credentials(self, **overrides: Any) -> FlexCredentials:
        """The merchant's REST credentials this simulator accepts, with any field replaced."""
        values: dict[str, Any] = {
            "merchant_id": self.merchant_id,
            "key_id": self.key_id,
            "shared_secret": Secret(self.secret),
        }
        return FlexCredentials(**(values | overrides))

    def config(self, **overrides: Any) -> FlexConfig:
        """A FlexConfig for this simulator, with short backoffs unless overridden."""
        values: dict[str, Any] = {
            "base_url": self.url,
            "credentials": self.credentials(),
            "backoff_initial": 0.05,
            "backoff_max": 0.5,
        }
        return FlexConfig(**(values | overrides))

    def _drain(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line)
            if '"flexsim_listening"' in line:
                self._listening.set()

    def finish(self) -> None:
        """Stop with SIGTERM unless a test already stopped it; expect 0 and no leaked PAN."""
        returncode = self.stop()
        assert_no_test_pans(self.output, "flexsim output")
        assert 0 == returncode, f"flexsim exited {returncode}:\n{self.output[-4000:]}"


class StartFlexSim(Protocol):
    """Start a simulator with extra command-line flags."""

    def __call__(self, *extra: str) -> FlexSim:
        """Start it and wait until it listens."""
        ...


def start_flexsim(*extra: str) -> FlexSim:
    """Start `relay flexsim serve` with extra flags and wait until it listens."""
    sim = FlexSim(extra)
    sim.wait_listening()
    return sim


def module_flexsim(*flags: str) -> Any:
    """A module-scoped fixture running a simulator with these flags."""

    @pytest.fixture(scope="module")
    def fixture() -> Iterator[FlexSim]:
        sim = start_flexsim(*flags)
        yield sim
        sim.finish()

    return fixture


@pytest.fixture(scope="session")
def flexsim() -> Iterator[FlexSim]:
    """One simulator without faults, shared by every test that needs no special flags."""
    sim = start_flexsim("--context-ttl", str(CONTEXT_TTL))
    yield sim
    sim.finish()


@pytest.fixture
def flexsim_factory() -> Iterator[StartFlexSim]:
    """Start simulators with extra flags for one test; each is stopped and checked after it."""
    started: list[FlexSim] = []

    def start(*extra: str) -> FlexSim:
        sim = start_flexsim(*extra)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.finish()


@dataclasses.dataclass
class Rig:
    """A FlexClient, its httpx client, and what went over the wire and into sleep."""

    flex: FlexClient
    http: httpx.AsyncClient
    config: FlexConfig
    sent: list[httpx.Request]
    sleeps: list[float]

    def sent_to(self, path_prefix: str) -> list[httpx.Request]:
        """The requests sent to paths starting with path_prefix."""
        return [r for r in self.sent if r.url.path.startswith(path_prefix)]


class MakeRig(Protocol):
    """Build a Rig over a simulator or an explicit config."""

    def __call__(
        self,
        sim: FlexSim | None = None,
        *,
        config: FlexConfig | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Rig:
        """Build it; the fixture closes its httpx client."""
        ...


@pytest.fixture
async def make_rig() -> AsyncIterator[MakeRig]:
    """Build FlexClients whose requests are recorded and whose backoff sleeps only record."""
    opened: list[httpx.AsyncClient] = []

    def make(
        sim: FlexSim | None = None,
        *,
        config: FlexConfig | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Rig:
        if config is None:
            assert sim is not None
            config = sim.config()
        sent: list[httpx.Request] = []
        sleeps: list[float] = []

        async def record(request: httpx.Request) -> None:
            sent.append(request)

        async def sleep(delay: float) -> None:
            sleeps.append(delay)

        http = http or new_http_client(config)
        opened.append(http)
        http.event_hooks = {"request": [record], "response": []}
        flex = FlexClient(http, config, sleep=sleep, clock=clock)
        return Rig(flex, http, config, sent, sleeps)

    yield make
    for http in opened:
        await http.aclose()


@pytest.fixture
async def rig(flexsim: FlexSim, make_rig: MakeRig) -> Rig:
    """A recorded FlexClient against the shared simulator."""
    return make_rig(flexsim)


@pytest.fixture
async def flex_client(rig: Rig) -> FlexClient:
    """A FlexClient over new_http_client against the shared simulator."""
    return rig.flex


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A plain httpx client for requests built by hand."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


def expiry_year() -> int:
    """A four-digit expiry year a few years ahead, valid whenever the suite runs."""
    return dt.datetime.now(dt.UTC).year + 3


def make_card(digits: str, code: str | None = "123", card_type: str | None = None) -> CardData:
    """A card expiring in December, three years ahead."""
    security_code = SecurityCode(code) if code is not None else None
    return CardData(Pan(digits), 12, expiry_year(), security_code, card_type)


def b64url_json(part: str) -> dict[str, Any]:
    """Decode one base64url JSON part of a compact token, unverified."""
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(value, dict)
    return value


def token_header(token: str) -> dict[str, Any]:
    """The unverified protected header of a compact JWS or JWE."""
    return b64url_json(token.split(".", maxsplit=1)[0])


def token_claims(token: str) -> dict[str, Any]:
    """The unverified payload of a compact JWS."""
    return b64url_json(token.split(".")[1])


def sha256_digest(body: bytes) -> str:
    """`SHA-256=` and the base64 SHA-256 of body, computed here, not with relay.flex.signing."""
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def hand_signed_headers(  # noqa: PLR0913  each part of the signature can be spoiled on purpose
    sim: FlexSim,
    body: bytes,
    *,
    secret: bytes | None = None,
    merchant_id: str | None = None,
    key_id: str | None = None,
    date: str | None = None,
    digest: str | None = None,
    target_label: str = "request-target",
) -> dict[str, str]:
    """Headers of a POST /flex/v2/sessions signed by hand, exactly as wire notes 5.1 say."""
    merchant_id = merchant_id or sim.merchant_id
    date = date or wsgiref.handlers.format_date_time(time.time())
    digest = digest or sha256_digest(body)
    names = ["host", "date", target_label, "digest", "v-c-merchant-id"]
    values = [sim.host, date, f"post {SESSIONS_PATH}", digest, merchant_id]
    signing_string = "\n".join(
        f"{name}: {value}" for name, value in zip(names, values, strict=True)
    )
    mac = hmac.new(secret or sim.secret, signing_string.encode("utf-8"), hashlib.sha256)
    signature = base64.b64encode(mac.digest()).decode("ascii")
    return {
        "Content-Type": "application/json;charset=utf-8",
        "Accept": "application/jwt",
        "v-c-merchant-id": merchant_id,
        "Date": date,
        "Digest": digest,
        "Signature": (
            f'keyid="{key_id or sim.key_id}", algorithm="HmacSHA256", '
            f'headers="{" ".join(names)}", signature="{signature}"'
        ),
    }


def session_body(fields: dict[str, Any] | None = None) -> bytes:
    """A sessions request body as the Python SDK serialises it (default separators)."""
    card = {"number": {}, "expirationMonth": {"required": False}}
    return json.dumps({"fields": fields or {"paymentInformation": {"card": card}}}).encode()


async def hand_signed_session(http: httpx.AsyncClient, sim: FlexSim) -> str:
    """A capture context obtained with a hand-signed request and no relay code at all."""
    body = session_body()
    response = await http.post(
        sim.url + SESSIONS_PATH, content=body, headers=hand_signed_headers(sim, body)
    )
    assert 201 == response.status_code, response.text
    return response.text


def assert_no_pan_in_error(exc: BaseException, *extra_digits: str) -> None:
    """Neither a test PAN nor any of extra_digits appears in the exception or its chain."""
    texts: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        texts.extend([str(current), repr(current)])
        current = current.__cause__ or current.__context__
    texts.append("".join(traceback.format_exception(exc)))
    text = "\n\n\n".join(texts)
    assert_no_test_pans(text, "exception text")
    assert [] == [hint for hint in extra_digits if hint in text]


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A loopback port a plain socket is bound to and listening on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]
