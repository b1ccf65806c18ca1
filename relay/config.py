"""Typed settings from the environment: one frozen dataclass per concern.

`Settings.from_env(env)` runs once per entry point and is passed down. Secrets come from
`RELAY_*_FILE` paths (or, for local use, the variable itself) into Secret. Every problem is
collected into one ConfigError naming variables, never values. Every secret or key file is
read (or, for files others read later, checked) with `relay.secrets.read_secret_file`: a file
other users may read is refused, except group-read by RELAY_SECRET_FILES_GROUP (Kubernetes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from relay.errors import ConfigError
from relay.flex.signing import decode_shared_secret
from relay.receipts import ReceiptSigner
from relay.secrets import (
    SECRET_FILES_GROUP_VARIABLE,
    Secret,
    check_secret_file,
    read_secret_file,
    secret_files_group,
)

DEFAULT_FLEX_URL = "https://apitest.cybersource.com"
DEFAULT_LEDGER_URL = "sqlite:///relay-ledger.db"
LOG_LEVELS = ("debug", "info", "warning", "error")
CVV_DELETE_AFTER_USE = "delete-after-use"
CVV_KEEP = "keep"
CVV_POLICIES = (CVV_DELETE_AFTER_USE, CVV_KEEP)
DEFAULT_CVV_MAX_AGE = 86_400
MIN_AUDIT_KEY_BYTES = 32


@dataclasses.dataclass(frozen=True, slots=True)
class FlexCredentials:
    """The merchant's REST credentials for HTTP Signature authentication."""

    merchant_id: str
    """The Cybersource merchant id, sent as v-c-merchant-id."""
    key_id: str
    """The shared-secret key id, sent as keyid in the Signature header."""
    shared_secret: Secret[bytes]
    """The base64-decoded shared secret."""


@dataclasses.dataclass(frozen=True, slots=True)
class FlexConfig:
    """Where Flex is and how to talk to it."""

    base_url: str = DEFAULT_FLEX_URL
    """Sessions and public keys are fetched from here, and only from here."""
    credentials: FlexCredentials | None = None
    """Needed to create sessions (merchant side); the PCI side posts tokens unauthenticated."""
    allowed_origins: frozenset[str] = frozenset()
    """Origins a capture context may send the JWE to; empty means the base URL's origin."""
    timeout: float = 10.0
    """Seconds for a whole Flex call (read, write, pool)."""
    connect_timeout: float = 3.0
    """Seconds to open a connection."""
    max_attempts: int = 3
    """Attempts for retryable calls (sessions, public keys)."""
    backoff_initial: float = 0.1
    """First backoff cap in seconds; doubles per attempt, full jitter."""
    backoff_max: float = 2.0
    """Upper bound for one backoff sleep."""
    ca_file: str | None = None
    """A PEM bundle to trust instead of the system's (test CAs, private gateways)."""
    leeway: int = 60
    """Seconds of clock skew tolerated on iat."""

    @property
    def origins(self) -> frozenset[str]:
        """The effective allow-list of capture-context origins."""
        return self.allowed_origins or frozenset({origin_of(self.base_url)})


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything a relay process reads from its environment."""

    flex: FlexConfig
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read RELAY_* variables, collecting every problem into one ConfigError."""
        reader = EnvReader(env)
        settings = cls(flex=flex_config(reader), log_level=log_level(reader))
        reader.raise_problems()
        return settings


@dataclasses.dataclass(frozen=True, slots=True)
class VaultConfig:
    """Where the PCI side's card vault lives and the keys that protect it."""

    url: Secret[str]
    """`sqlite:///path/to/vault.db` or a `postgresql://` DSN (which may carry a password)."""
    kek_file: str
    """The keyring of key-encryption keys: lines `VERSION:BASE64KEY`; the highest is current."""
    fingerprint_key: Secret[bytes]
    """The HMAC-SHA256 key of card fingerprints, separate from the KEKs (PCI DSS 3.5.1.1)."""
    audit_key: Secret[bytes]
    """The HMAC-SHA256 key of the audit chain, so a database writer cannot recompute its hashes."""
    pool_size: int = 10
    """Connections in the PostgreSQL pool."""
    cvv_policy: str = CVV_DELETE_AFTER_USE
    """What a successful tokenization does to a stored CVV (PCI DSS 4.0 3.3.1.2, 3.3.3):
    `delete-after-use` deletes it; `keep` is for issuers with a documented business need."""
    cvv_max_age: int = DEFAULT_CVV_MAX_AGE
    """Seconds after its card was stored past which a CVV is deleted, under either policy."""
    secret_files_group: int | None = None
    """RELAY_SECRET_FILES_GROUP: the group that may read the KEK file (see read_secret_file)."""

    @property
    def backend(self) -> str:
        """`sqlite` or `postgresql`."""
        return self.url.get_secret_value().split(":", 1)[0].split("+", 1)[0]


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """A gRPC listener and its TLS material."""

    host: str = "127.0.0.1"
    """The address to bind."""
    port: int = 50051
    """The port to bind; 0 picks a free one (logged at start)."""
    tls_cert_file: str | None = None
    """The server certificate chain (PEM)."""
    tls_key_file: str | None = None
    """The server private key (PEM)."""
    client_ca_file: str | None = None
    """The CA that issues client certificates; set means mutual TLS is required."""
    insecure_dev: bool = False
    """Plaintext for local development only; must be asked for explicitly."""
    drain_seconds: float = 10.0
    """How long in-flight calls may run after SIGTERM."""
    health_port: int | None = None
    """A second listener, plaintext, serving only grpc.health.v1 (for the kubelet's gRPC
    probes, which speak no TLS); None means none, 0 picks a free port."""


@dataclasses.dataclass(frozen=True, slots=True)
class PciConfig:
    """The PciRelay worker."""

    server: ServerConfig
    flex: FlexConfig
    vault: VaultConfig
    receipt_key: Secret[bytes]
    """RELAY_PCI_RECEIPT_KEY_FILE: the Ed25519 private key (PEM) that signs release receipts."""
    rate_per_second: float = 50.0
    """Sustained tokenizations per second allowed to one merchant."""
    rate_burst: int = 100
    """Tokenizations one merchant may make at once before the rate applies."""
    stream_concurrency: int = 32
    """Requests of one TokenizeStream worked on at once; the stream is not read further."""


@dataclasses.dataclass(frozen=True, slots=True)
class PciClientConfig:
    """How the merchant side reaches PciRelay: mutual TLS with a certificate naming the merchant."""

    target: str
    """host:port of PciRelay."""
    tls_cert_file: str | None = None
    """The merchant's client certificate (PEM); its SAN URI or CN is the merchant id."""
    tls_key_file: str | None = None
    """The client certificate's private key (PEM)."""
    ca_file: str | None = None
    """The CA that issued PciRelay's server certificate."""
    server_name: str | None = None
    """The name to expect in PciRelay's certificate, when it differs from the target host."""
    insecure_dev: bool = False
    """Plaintext, merchant id sent as metadata: local development only."""
    merchant_id: str = ""
    """Sent as metadata under --insecure-dev only; with TLS the certificate says who we are."""


@dataclasses.dataclass(frozen=True, slots=True)
class MerchantConfig:
    """The MerchantGateway service."""

    server: ServerConfig
    flex: FlexConfig
    pci: PciClientConfig
    ledger_url: Secret[str]
    """Where the idempotency ledger records tokens by request_id, so a retry never tokenizes
    twice. `sqlite:///relay-ledger.db` (the default: a file in the working directory; four
    slashes for an absolute path) for one replica, which alone may open it; a `postgresql://`
    DSN for replicas that share idempotency; `memory`, forgotten on restart, only under
    --insecure-dev."""
    bulk_concurrency: int = 32
    """Requests of one RequestTokens stream worked on at once."""
    default_deadline: float = 30.0
    """Seconds a request may take when the caller set no deadline; recovery (a fresh session,
    PciRelay unavailable or restarting) retries with backoff for as long as this allows."""
    app_rate: float = 50.0
    """Calls per second each merchant app may make, sustained (every RPC, and each item of a
    RequestTokens stream, counts one)."""
    app_burst: int = 100
    """Calls each merchant app may make at once, above app_rate."""


@dataclasses.dataclass(frozen=True, slots=True)
class MerchantSettings:
    """What `relay merchant serve` reads."""

    merchant: MerchantConfig
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, insecure_dev: bool = False) -> MerchantSettings:
        """Read RELAY_MERCHANT_*, RELAY_FLEX_* and RELAY_LOG_LEVEL."""
        reader = EnvReader(env)
        flex = flex_config(reader)
        if flex.credentials is None:
            reader.problem(
                "RELAY_FLEX_MERCHANT_ID, RELAY_FLEX_KEY_ID and RELAY_FLEX_SHARED_SECRET_FILE "
                "are required: the merchant side creates Flex sessions"
            )
        merchant = MerchantConfig(
            server=server_config(
                reader, "RELAY_MERCHANT", default_port=50052, insecure_dev=insecure_dev
            ),
            flex=flex,
            pci=pci_client_config(reader, insecure_dev=insecure_dev),
            ledger_url=Secret(
                reader.secret_text("RELAY_MERCHANT_LEDGER_URL")
                or reader.get("RELAY_MERCHANT_LEDGER_URL", DEFAULT_LEDGER_URL)
                or DEFAULT_LEDGER_URL
            ),
            bulk_concurrency=reader.integer("RELAY_MERCHANT_BULK_CONCURRENCY", 32),
            default_deadline=reader.number("RELAY_MERCHANT_DEFAULT_DEADLINE_SECONDS", 30.0),
            app_rate=reader.number("RELAY_MERCHANT_APP_RATE", 50.0),
            app_burst=reader.integer("RELAY_MERCHANT_APP_BURST", 100),
        )
        check_ledger_url(reader, merchant.ledger_url.get_secret_value(), insecure_dev=insecure_dev)
        settings = cls(merchant, log_level(reader))
        reader.raise_problems()
        return settings


def check_ledger_url(reader: EnvReader, url: str, *, insecure_dev: bool) -> None:
    """RELAY_MERCHANT_LEDGER_URL: durable (SQLite, PostgreSQL), or memory for local dev only."""
    if url == "memory":
        if not insecure_dev:
            reader.problem(
                "RELAY_MERCHANT_LEDGER_URL=memory forgets every token on restart: use "
                "sqlite:///PATH or a postgresql:// DSN (memory is for --insecure-dev only)"
            )
    elif url.startswith("sqlite:///"):
        if url in {"sqlite:///", "sqlite:///:memory:"}:
            reader.problem("RELAY_MERCHANT_LEDGER_URL must name a file: sqlite:///PATH")
    elif not url.startswith(("postgresql://", "postgres://")):
        reader.problem(
            "RELAY_MERCHANT_LEDGER_URL must be sqlite:///PATH (sqlite:////ABSOLUTE/PATH), "
            "a postgresql:// DSN, or memory under --insecure-dev"
        )
    elif reader.get("RELAY_MERCHANT_LEDGER_URL") and _has_password(url):
        reader.problem("RELAY_MERCHANT_LEDGER_URL carries a password: use its _FILE form")


def pci_client_config(reader: EnvReader, *, insecure_dev: bool) -> PciClientConfig:
    """Read RELAY_MERCHANT_PCI_*."""
    config = PciClientConfig(
        target=reader.get("RELAY_MERCHANT_PCI_TARGET", "127.0.0.1:50051") or "",
        tls_cert_file=reader.path("RELAY_MERCHANT_PCI_TLS_CERT_FILE"),
        tls_key_file=reader.secret_path("RELAY_MERCHANT_PCI_TLS_KEY_FILE"),
        ca_file=reader.path("RELAY_MERCHANT_PCI_CA_FILE"),
        server_name=reader.get("RELAY_MERCHANT_PCI_SERVER_NAME"),
        insecure_dev=insecure_dev,
        merchant_id=reader.get("RELAY_FLEX_MERCHANT_ID", "") or "",
    )
    files = (config.tls_cert_file, config.tls_key_file, config.ca_file)
    if not insecure_dev and None in files and not reader.has_problems():
        reader.problem(
            "RELAY_MERCHANT_PCI_TLS_CERT_FILE, RELAY_MERCHANT_PCI_TLS_KEY_FILE and "
            "RELAY_MERCHANT_PCI_CA_FILE are required (mutual TLS to PciRelay), unless started "
            "with --insecure-dev for local development"
        )
    return config


@dataclasses.dataclass(frozen=True, slots=True)
class VaultSettings:
    """What `relay cards ...` reads: the vault and logging."""

    vault: VaultConfig
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VaultSettings:
        """Read RELAY_VAULT_* and RELAY_LOG_LEVEL."""
        reader = EnvReader(env)
        settings = cls(vault_config(reader), log_level(reader))
        reader.raise_problems()
        return settings


@dataclasses.dataclass(frozen=True, slots=True)
class PciSettings:
    """What `relay pci serve` reads."""

    pci: PciConfig
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, insecure_dev: bool = False) -> PciSettings:
        """Read RELAY_PCI_*, RELAY_VAULT_*, RELAY_FLEX_* and RELAY_LOG_LEVEL."""
        reader = EnvReader(env)
        pci = PciConfig(
            server=server_config(
                reader, "RELAY_PCI", default_port=50051, insecure_dev=insecure_dev
            ),
            flex=flex_config(reader),
            vault=vault_config(reader),
            receipt_key=Secret(receipt_key(reader)),
            rate_per_second=reader.number("RELAY_PCI_RATE_PER_SECOND", 50.0),
            rate_burst=reader.integer("RELAY_PCI_RATE_BURST", 100),
            stream_concurrency=reader.integer("RELAY_PCI_STREAM_CONCURRENCY", 32),
        )
        settings = cls(pci, log_level(reader))
        reader.raise_problems()
        return settings


def receipt_key(reader: EnvReader) -> bytes:
    """RELAY_PCI_RECEIPT_KEY_FILE: required, an Ed25519 private key in PEM (see relay.receipts)."""
    name = "RELAY_PCI_RECEIPT_KEY_FILE"
    if reader.get(name) is None:
        reader.problem(f"{name} is required (create one with `relay pci receipt-key generate`)")
        return b""
    pem = reader.secret_bytes(name)
    if pem is None:
        return b""
    try:
        ReceiptSigner(pem)
    except ValueError:
        reader.problem(f"{name} does not hold an Ed25519 private key in PEM")
        return b""
    return pem


def log_level(reader: EnvReader) -> str:
    """RELAY_LOG_LEVEL."""
    return reader.choice("RELAY_LOG_LEVEL", LOG_LEVELS, "info")


def vault_config(reader: EnvReader) -> VaultConfig:
    """Read RELAY_VAULT_URL (or _FILE), RELAY_VAULT_KEK_FILE and the two HMAC key files."""
    url = reader.secret_text("RELAY_VAULT_URL") or reader.get("RELAY_VAULT_URL")
    if url is None:
        reader.problem("RELAY_VAULT_URL or RELAY_VAULT_URL_FILE is required")
        url = "sqlite:///missing"
    elif not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        reader.problem("RELAY_VAULT_URL must start with sqlite:/// or postgresql://")
    elif reader.get("RELAY_VAULT_URL") and _has_password(url):
        reader.problem("RELAY_VAULT_URL carries a password: use RELAY_VAULT_URL_FILE")
    kek_file = reader.secret_path("RELAY_VAULT_KEK_FILE")
    if kek_file is None and reader.get("RELAY_VAULT_KEK_FILE") is None:
        reader.problem("RELAY_VAULT_KEK_FILE is required")
    fingerprint = reader.secret_text("RELAY_VAULT_FINGERPRINT_KEY")
    key = b""
    if fingerprint is None:
        reader.problem("RELAY_VAULT_FINGERPRINT_KEY_FILE is required")
    else:
        try:
            key = decode_shared_secret(fingerprint).get_secret_value()
        except ValueError:
            key = b""
        if len(key) < 32:
            reader.problem("RELAY_VAULT_FINGERPRINT_KEY_FILE must hold at least 32 base64 bytes")
    return VaultConfig(
        url=Secret(url),
        kek_file=kek_file or "",
        fingerprint_key=Secret(key),
        audit_key=Secret(_audit_key(reader)),
        pool_size=reader.integer("RELAY_VAULT_POOL_SIZE", 10),
        cvv_policy=reader.choice("RELAY_VAULT_CVV_POLICY", CVV_POLICIES, CVV_DELETE_AFTER_USE),
        cvv_max_age=reader.integer("RELAY_VAULT_CVV_MAX_AGE", DEFAULT_CVV_MAX_AGE),
        secret_files_group=reader.secret_group,
    )


def _audit_key(reader: EnvReader) -> bytes:
    """RELAY_VAULT_AUDIT_KEY_FILE: raw bytes (not text), at least 32 of them."""
    name = "RELAY_VAULT_AUDIT_KEY_FILE"
    path = reader.path(name)
    if path is None:
        if reader.get(name) is None:
            reader.problem(f"{name} is required")
        return b""
    try:
        key = read_secret_file(path, name, group=reader.secret_group)
    except ConfigError as exc:
        reader.problem("; ".join(exc.problems))
        return b""
    if len(key) < MIN_AUDIT_KEY_BYTES:
        reader.problem(f"{name} must hold at least {MIN_AUDIT_KEY_BYTES} bytes")
    return key


def server_config(
    reader: EnvReader, prefix: str, *, default_port: int, insecure_dev: bool = False
) -> ServerConfig:
    """Read PREFIX_HOST, _PORT, _HEALTH_PORT, _DRAIN_SECONDS and the three TLS file variables.

    Plaintext is never a setting: only the explicit --insecure-dev flag passes insecure_dev.
    """
    insecure = insecure_dev
    config = ServerConfig(
        host=reader.get(f"{prefix}_HOST", "127.0.0.1") or "127.0.0.1",
        port=reader.integer(f"{prefix}_PORT", default_port, minimum=0),
        tls_cert_file=reader.path(f"{prefix}_TLS_CERT_FILE"),
        tls_key_file=reader.secret_path(f"{prefix}_TLS_KEY_FILE"),
        client_ca_file=reader.path(f"{prefix}_CLIENT_CA_FILE"),
        insecure_dev=insecure,
        drain_seconds=reader.number(f"{prefix}_DRAIN_SECONDS", 10.0),
        health_port=(
            reader.integer(f"{prefix}_HEALTH_PORT", 0, minimum=0)
            if reader.get(f"{prefix}_HEALTH_PORT") is not None
            else None
        ),
    )
    if config.port > 65535:
        reader.problem(f"{prefix}_PORT must be at most 65535")
    if config.health_port is not None and (
        config.health_port > 65535 or config.health_port == config.port != 0
    ):
        reader.problem(f"{prefix}_HEALTH_PORT must be at most 65535 and differ from {prefix}_PORT")
    tls = (config.tls_cert_file, config.tls_key_file, config.client_ca_file)
    if not insecure and None in tls and not reader.has_problems():
        reader.problem(
            f"{prefix}_TLS_CERT_FILE, {prefix}_TLS_KEY_FILE and {prefix}_CLIENT_CA_FILE are "
            "required (mutual TLS), unless started with --insecure-dev for local development"
        )
    return config


def _has_password(url: str) -> bool:
    try:
        return bool(urllib.parse.urlsplit(url).password)
    except ValueError:
        return True


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL, lower-cased, default ports dropped."""
    parts = urllib.parse.urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{host}{port}"


def flex_config(reader: EnvReader) -> FlexConfig:
    """Read the RELAY_FLEX_* variables."""
    base_url = reader.url("RELAY_FLEX_BASE_URL", DEFAULT_FLEX_URL)
    origins = frozenset(
        origin_of(item) for item in reader.list("RELAY_FLEX_ALLOWED_ORIGINS") if reader.is_url(item)
    )
    if len(origins) != len(reader.list("RELAY_FLEX_ALLOWED_ORIGINS")):
        reader.problem("RELAY_FLEX_ALLOWED_ORIGINS must be a comma-separated list of URLs")
    return FlexConfig(
        base_url=base_url,
        credentials=flex_credentials(reader),
        allowed_origins=origins,
        timeout=reader.number("RELAY_FLEX_TIMEOUT_SECONDS", 10.0),
        connect_timeout=reader.number("RELAY_FLEX_CONNECT_TIMEOUT_SECONDS", 3.0),
        max_attempts=reader.integer("RELAY_FLEX_MAX_ATTEMPTS", 3),
        ca_file=reader.path("RELAY_FLEX_CA_FILE"),
    )


def flex_credentials(reader: EnvReader) -> FlexCredentials | None:
    """Read merchant id, key id and shared secret; all three or none."""
    merchant_id = reader.get("RELAY_FLEX_MERCHANT_ID")
    key_id = reader.get("RELAY_FLEX_KEY_ID")
    secret_text = reader.secret_text("RELAY_FLEX_SHARED_SECRET")
    if reader.get("RELAY_FLEX_SHARED_SECRET") is not None:
        reader.problem(
            "RELAY_FLEX_SHARED_SECRET is not read: put the secret in a file and set "
            "RELAY_FLEX_SHARED_SECRET_FILE"
        )
    given = [value is not None for value in (merchant_id, key_id, secret_text)]
    if not any(given):
        return None
    if not all(given):
        reader.problem(
            "RELAY_FLEX_MERCHANT_ID, RELAY_FLEX_KEY_ID and RELAY_FLEX_SHARED_SECRET_FILE "
            "go together"
        )
        return None
    assert merchant_id is not None
    assert key_id is not None
    assert secret_text is not None
    try:
        secret = decode_shared_secret(secret_text)
    except ValueError:
        reader.problem("RELAY_FLEX_SHARED_SECRET_FILE does not hold a base64 shared secret")
        return None
    return FlexCredentials(merchant_id, key_id, secret)


class EnvReader:
    """Reads typed values from an env mapping and collects problems instead of raising."""

    def __init__(self, env: Mapping[str, str]) -> None:
        """Wrap the mapping (os.environ in production, a dict in tests)."""
        self._env = env
        self._problems: list[str] = []
        self.secret_group: int | None = None
        """RELAY_SECRET_FILES_GROUP: a gid whose members may read secret files (Kubernetes)."""
        try:
            self.secret_group = secret_files_group(self.get(SECRET_FILES_GROUP_VARIABLE))
        except ConfigError as exc:
            self._problems.extend(exc.problems)

    def problem(self, text: str) -> None:
        """Record a problem (a variable name and what is wrong, never its value)."""
        self._problems.append(text)

    def raise_problems(self) -> None:
        """Raise one ConfigError listing every problem, if there were any."""
        if self._problems:
            raise ConfigError(self._problems)

    def has_problems(self) -> bool:
        """Whether a problem was recorded so far."""
        return bool(self._problems)

    def get(self, name: str, default: str | None = None) -> str | None:
        """A stripped string, or the default when unset or empty."""
        value = self._env.get(name, "").strip()
        return value or default

    def list(self, name: str) -> list[str]:
        """A comma-separated list."""
        return [item.strip() for item in (self.get(name) or "").split(",") if item.strip()]

    def number(self, name: str, default: float) -> float:
        """A positive, finite number."""
        text = self.get(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            self.problem(f"{name} must be a positive number")
            return default
        return value

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        """A whole number of at least minimum."""
        text = self.get(name)
        if text is None:
            return default
        if not (text.isascii() and text.isdigit() and int(text) >= minimum):
            self.problem(f"{name} must be a whole number of at least {minimum}")
            return default
        return int(text)

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        """One of a fixed set of words."""
        value = (self.get(name) or default).lower()
        if value not in allowed:
            self.problem(f"{name} must be one of {', '.join(allowed)}")
            return default
        return value

    def is_url(self, text: str) -> bool:
        """Whether text is an http(s) URL with a host and, if any, a valid port."""
        try:
            parts = urllib.parse.urlsplit(text)
            _ = parts.port
        except ValueError:
            return False
        return parts.scheme in {"http", "https"} and bool(parts.hostname)

    def url(self, name: str, default: str) -> str:
        """An http(s) URL without a trailing slash."""
        value = self.get(name, default) or default
        if not self.is_url(value):
            self.problem(f"{name} must be an http(s) URL")
            return default
        return value.rstrip("/")

    def path(self, name: str) -> str | None:
        """A path to an existing file."""
        value = self.get(name)
        if value is not None and not Path(value).is_file():
            self.problem(f"{name} names a file that does not exist")
            return None
        return value

    def secret_path(self, name: str) -> str | None:
        """A path to an existing secret file that only its owner (or the secret group) may read.

        For key files another component reads later (TLS keys, the KEK keyring).
        """
        path = self.path(name)
        if path is not None:
            try:
                check_secret_file(path, name, group=self.secret_group)
            except ConfigError as exc:
                self._problems.extend(exc.problems)
                return None
        return path

    def secret_bytes(self, name: str) -> bytes | None:
        """The bytes of the private secret file named by the variable `name`, or None."""
        path = self.path(name)
        if path is None:
            return None
        try:
            return read_secret_file(path, name, group=self.secret_group)
        except ConfigError as exc:
            self._problems.extend(exc.problems)
            return None

    def secret_text(self, name: str) -> str | None:
        """A secret from the file named by NAME_FILE: secrets never sit in the environment."""
        data = self.secret_bytes(f"{name}_FILE")
        if data is None:
            return None
        try:
            return data.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            self.problem(f"{name}_FILE cannot be read as text")
            return None


class _RecordingEnv(dict[str, str]):
    """An empty environment that remembers every name asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.seen.add(key)
        return default


def known_variables() -> frozenset[str]:
    """Every RELAY_* name some entry point reads: what deploy/ manifests may set."""
    env = _RecordingEnv()
    for load in (Settings.from_env, VaultSettings.from_env, PciSettings.from_env):
        with contextlib.suppress(ConfigError):
            load(env)
    with contextlib.suppress(ConfigError):
        MerchantSettings.from_env(env)
    return frozenset(env.seen)
