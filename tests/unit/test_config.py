"""Settings.from_env: typed settings from a dict, secrets from files, one ConfigError for all."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.config import (
    FlexConfig,
    FlexCredentials,
    MerchantSettings,
    PciSettings,
    Settings,
    origin_of,
)
from relay.errors import ConfigError
from relay.receipts import ReceiptSigner, generate_receipt_key
from relay.secrets import Secret

RAW_SECRET = b"shared-secret-bytes-for-config-tests-0123456789"
B64_SECRET = base64.b64encode(RAW_SECRET).decode("ascii")


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A shared-secret file as a Kubernetes secret mount would hold it (with a newline)."""
    path = tmp_path / "shared-secret"
    path.write_text(B64_SECRET + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def credentials_env(secret_path: Path) -> dict[str, str]:
    return {
        "RELAY_FLEX_MERCHANT_ID": "testrest",
        "RELAY_FLEX_KEY_ID": "08c94330-f618-42a3-b09d-e1e43be5efda",
        "RELAY_FLEX_SHARED_SECRET_FILE": str(secret_path),
    }


def config_error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    return info.value


def test_an_empty_env_gives_the_defaults():
    """With no variables set, every setting takes its documented default."""
    expected = Settings(flex=FlexConfig(), log_level="info")
    assert expected == Settings.from_env({})
    assert "https://apitest.cybersource.com" == Settings.from_env({}).flex.base_url
    assert None is Settings.from_env({}).flex.credentials


def test_empty_values_count_as_unset():
    """Variables set to blanks (as an empty ConfigMap entry gives) fall back to the defaults."""
    env = {"RELAY_FLEX_BASE_URL": "  ", "RELAY_FLEX_TIMEOUT_SECONDS": "", "RELAY_LOG_LEVEL": ""}
    assert Settings(flex=FlexConfig()) == Settings.from_env(env)


def test_every_relay_flex_variable_is_read(secret_file: Path, tmp_path: Path):
    """Each RELAY_FLEX_* variable and RELAY_LOG_LEVEL lands in its typed field."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
    env = {
        **credentials_env(secret_file),
        "RELAY_FLEX_BASE_URL": "https://flexsim.internal:8443/",
        "RELAY_FLEX_ALLOWED_ORIGINS": "https://Flex.Test:443/x, http://127.0.0.1:9000",
        "RELAY_FLEX_TIMEOUT_SECONDS": "7.5",
        "RELAY_FLEX_CONNECT_TIMEOUT_SECONDS": "1.5",
        "RELAY_FLEX_MAX_ATTEMPTS": "5",
        "RELAY_FLEX_CA_FILE": str(ca_file),
        "RELAY_LOG_LEVEL": "DEBUG",
    }
    expected = Settings(
        flex=FlexConfig(
            base_url="https://flexsim.internal:8443",
            credentials=FlexCredentials(
                "testrest", "08c94330-f618-42a3-b09d-e1e43be5efda", Secret(RAW_SECRET)
            ),
            allowed_origins=frozenset({"https://flex.test", "http://127.0.0.1:9000"}),
            timeout=7.5,
            connect_timeout=1.5,
            max_attempts=5,
            ca_file=str(ca_file),
        ),
        log_level="debug",
    )
    assert expected == Settings.from_env(env)


def test_the_shared_secret_is_read_from_its_file_and_decoded(secret_file: Path):
    """RELAY_FLEX_SHARED_SECRET_FILE names a file of base64, and the settings hold its bytes."""
    credentials = Settings.from_env(credentials_env(secret_file)).flex.credentials
    assert credentials is not None
    assert RAW_SECRET == credentials.shared_secret.get_secret_value()


def test_a_merchant_id_without_a_secret_names_the_variables():
    """A merchant id alone is one problem naming the three credential variables."""
    error = config_error({"RELAY_FLEX_MERCHANT_ID": "testrest"})
    assert 1 == len(error.problems)
    named = [
        name
        for name in ("RELAY_FLEX_MERCHANT_ID", "RELAY_FLEX_KEY_ID", "RELAY_FLEX_SHARED_SECRET_FILE")
        if name in error.problems[0]
    ]
    assert ["RELAY_FLEX_MERCHANT_ID", "RELAY_FLEX_KEY_ID", "RELAY_FLEX_SHARED_SECRET_FILE"] == named
    assert "testrest" not in str(error)


def test_every_problem_is_reported_in_one_error(tmp_path: Path):
    """Several bad values at once give one ConfigError listing each problem, in reading order."""
    env = {
        "RELAY_FLEX_BASE_URL": "ftp://flex.test",
        "RELAY_FLEX_ALLOWED_ORIGINS": "https://ok.test,not-a-url",
        "RELAY_FLEX_KEY_ID": "key-without-merchant",
        "RELAY_FLEX_TIMEOUT_SECONDS": "soon",
        "RELAY_FLEX_CONNECT_TIMEOUT_SECONDS": "-1",
        "RELAY_FLEX_MAX_ATTEMPTS": "0",
        "RELAY_FLEX_CA_FILE": str(tmp_path / "missing.pem"),
        "RELAY_LOG_LEVEL": "loud",
    }
    expected = [
        "RELAY_FLEX_BASE_URL must be an http(s) URL",
        "RELAY_FLEX_ALLOWED_ORIGINS must be a comma-separated list of URLs",
        "RELAY_FLEX_MERCHANT_ID, RELAY_FLEX_KEY_ID and RELAY_FLEX_SHARED_SECRET_FILE go together",
        "RELAY_FLEX_TIMEOUT_SECONDS must be a positive number",
        "RELAY_FLEX_CONNECT_TIMEOUT_SECONDS must be a positive number",
        "RELAY_FLEX_MAX_ATTEMPTS must be a whole number of at least 1",
        "RELAY_FLEX_CA_FILE names a file that does not exist",
        "RELAY_LOG_LEVEL must be one of debug, info, warning, error",
    ]
    error = config_error(env)
    assert expected == error.problems
    assert "invalid configuration: " + "; ".join(expected) == str(error)
    leaked = [value for value in env.values() if value in str(error)]
    assert [] == leaked


@pytest.mark.parametrize("text", ["not base64!", "c2VjcmV0*", "===="])
def test_a_bad_secret_file_is_named_without_its_value(tmp_path: Path, text: str):
    """A secret file that is not base64 is named in the error; its content is never shown."""
    path = tmp_path / "shared-secret"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    error = config_error(credentials_env(path))
    expected = ["RELAY_FLEX_SHARED_SECRET_FILE does not hold a base64 shared secret"]
    assert expected == error.problems
    assert text not in f"{error} {error!r} {error.args}"


def test_a_missing_secret_file_is_named(tmp_path: Path):
    """RELAY_FLEX_SHARED_SECRET_FILE pointing nowhere is reported by name."""
    error = config_error(credentials_env(tmp_path / "absent"))
    assert "RELAY_FLEX_SHARED_SECRET_FILE names a file that does not exist" in error.problems


def test_the_settings_repr_hides_the_secret(secret_file: Path):
    """Neither repr nor str of the settings shows the secret bytes or their base64."""
    settings = Settings.from_env(credentials_env(secret_file))
    rendered = f"{settings!r} {settings} {settings.flex} {settings.flex.credentials!r}"
    found = [
        form
        for form in (repr(RAW_SECRET), RAW_SECRET.decode("ascii"), B64_SECRET)
        if form in rendered
    ]
    assert [] == found
    assert "Secret(**********)" in rendered


@pytest.mark.parametrize("value", ["0.5", "2.5", "nan", "inf"])
def test_max_attempts_must_be_a_positive_whole_number(value: str):
    """RELAY_FLEX_MAX_ATTEMPTS that is not a whole number is a ConfigError, not 0 or a crash."""
    error = config_error({"RELAY_FLEX_MAX_ATTEMPTS": value})
    assert [True] == ["RELAY_FLEX_MAX_ATTEMPTS" in problem for problem in error.problems]


@pytest.mark.parametrize("value", ["nan", "-inf"])
@pytest.mark.parametrize(
    "name", ["RELAY_FLEX_TIMEOUT_SECONDS", "RELAY_FLEX_CONNECT_TIMEOUT_SECONDS"]
)
def test_timeouts_must_be_positive_numbers(name: str, value: str):
    """A NaN (not a positive number) or negative infinite timeout is refused by name."""
    error = config_error({name: value})
    assert [f"{name} must be a positive number"] == error.problems


@pytest.mark.parametrize(
    "url", ["https://flex.test:99999", "https://flex.test:port"], ids=["99999", "word"]
)
@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("RELAY_FLEX_BASE_URL", "RELAY_FLEX_BASE_URL must be an http(s) URL"),
        (
            "RELAY_FLEX_ALLOWED_ORIGINS",
            "RELAY_FLEX_ALLOWED_ORIGINS must be a comma-separated list of URLs",
        ),
    ],
    ids=["base-url", "allowed-origins"],
)
def test_a_url_with_a_bad_port_is_a_config_error(name: str, problem: str, url: str):
    """A URL whose port is not a valid port number is reported by name, not raised as ValueError."""
    assert [problem] == config_error({name: url}).problems


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Example.com:443/x", "https://example.com"),
        ("HTTPS://EXAMPLE.COM/", "https://example.com"),
        ("http://example.com:80/a?b=c", "http://example.com"),
        ("https://example.com:8443/flex/v2/tokens", "https://example.com:8443"),
        ("http://example.com:443", "http://example.com:443"),
        ("https://[::1]:8443/x", "https://[::1]:8443"),
        ("https://[::1]:443", "https://[::1]"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ],
)
def test_origin_of_normalises(url: str, expected: str):
    """origin_of lower-cases scheme and host, drops the path and default ports, keeps others."""
    assert expected == origin_of(url)


def test_origins_fall_back_to_the_base_url_origin():
    """With no allowed origins configured, the base URL's own origin is the allow-list."""
    config = FlexConfig(base_url="https://FlexSim.internal:443")
    assert frozenset({"https://flexsim.internal"}) == config.origins


def test_configured_origins_replace_the_fallback():
    """Configured allowed origins are the allow-list, without the base URL's origin."""
    config = FlexConfig(allowed_origins=frozenset({"https://testflex.cybersource.com"}))
    assert frozenset({"https://testflex.cybersource.com"}) == config.origins


def _pci_env(tmp_path, **extra: str) -> dict[str, str]:
    kek = tmp_path / "kek"
    kek.write_text("1:" + base64.b64encode(b"k" * 32).decode())
    fingerprint = tmp_path / "fp"
    fingerprint.write_text(base64.b64encode(b"f" * 32).decode())
    kek.chmod(0o600)
    fingerprint.chmod(0o600)
    audit = tmp_path / "audit.key"
    audit.touch(mode=0o600)
    audit.write_bytes(b"\x00a\n" * 11)
    receipt_key = tmp_path / "receipt.key"
    if not receipt_key.exists():
        receipt_key.touch(mode=0o600)
        receipt_key.write_bytes(generate_receipt_key())
    return {
        "RELAY_VAULT_URL": f"sqlite:///{tmp_path}/v.db",
        "RELAY_VAULT_KEK_FILE": str(kek),
        "RELAY_VAULT_FINGERPRINT_KEY_FILE": str(fingerprint),
        "RELAY_VAULT_AUDIT_KEY_FILE": str(audit),
        "RELAY_PCI_RECEIPT_KEY_FILE": str(receipt_key),
        **extra,
    }


def test_the_receipt_key_is_read_from_its_file(tmp_path):
    """RELAY_PCI_RECEIPT_KEY_FILE's PEM becomes the worker's receipt key, held as a Secret."""
    env = _pci_env(tmp_path)
    settings = PciSettings.from_env(env, insecure_dev=True)
    key = settings.pci.receipt_key
    expected = Path(env["RELAY_PCI_RECEIPT_KEY_FILE"]).read_bytes()
    assert (expected, "Secret(**********)") == (key.get_secret_value(), repr(key))


def _rsa_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "RELAY_PCI_RECEIPT_KEY_FILE is required"),
        (b"not a key", "RELAY_PCI_RECEIPT_KEY_FILE does not hold an Ed25519 private key in PEM"),
        (_rsa_pem, "RELAY_PCI_RECEIPT_KEY_FILE does not hold an Ed25519 private key in PEM"),
        (
            lambda: ReceiptSigner(generate_receipt_key()).public_pem(),
            "RELAY_PCI_RECEIPT_KEY_FILE does not hold an Ed25519 private key in PEM",
        ),
    ],
    ids=["missing", "junk", "rsa", "public-only"],
)
def test_a_missing_or_wrong_receipt_key_is_refused(tmp_path, content, problem):
    """No receipt key, or one that is not an Ed25519 private key, is a problem naming it."""
    env = _pci_env(tmp_path)
    if content is None:
        del env["RELAY_PCI_RECEIPT_KEY_FILE"]
    else:
        data = content() if callable(content) else content
        Path(env["RELAY_PCI_RECEIPT_KEY_FILE"]).write_bytes(data)
    with pytest.raises(ConfigError) as info:
        PciSettings.from_env(env, insecure_dev=True)
    named = [found for found in info.value.problems if "RELAY_PCI_RECEIPT_KEY_FILE" in found]
    assert [True] == [problem in found for found in named]


def test_the_audit_key_is_read_as_raw_bytes(tmp_path):
    """RELAY_VAULT_AUDIT_KEY_FILE is taken byte for byte: no decoding, no stripping."""
    settings = PciSettings.from_env(_pci_env(tmp_path), insecure_dev=True)
    assert b"\x00a\n" * 11 == settings.pci.vault.audit_key.get_secret_value()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "RELAY_VAULT_AUDIT_KEY_FILE is required"),
        (b"k" * 31, "RELAY_VAULT_AUDIT_KEY_FILE must hold at least 32 bytes"),
    ],
    ids=["missing", "short"],
)
def test_a_missing_or_short_audit_key_is_refused(tmp_path, content, problem):
    """No audit key, or one under 32 bytes, is a ConfigError naming the setting."""
    env = _pci_env(tmp_path)
    if content is None:
        del env["RELAY_VAULT_AUDIT_KEY_FILE"]
    else:
        Path(env["RELAY_VAULT_AUDIT_KEY_FILE"]).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        PciSettings.from_env(env, insecure_dev=True)
    assert [problem] == info.value.problems


def test_health_port_is_optional_and_must_differ_from_the_main_port(tmp_path):
    """Unset means no health listener; equal to the main port is a problem naming both."""
    unset = PciSettings.from_env(_pci_env(tmp_path), insecure_dev=True)
    chosen = PciSettings.from_env(
        _pci_env(tmp_path, RELAY_PCI_HEALTH_PORT="8081"), insecure_dev=True
    )
    assert (None, 8081) == (unset.pci.server.health_port, chosen.pci.server.health_port)
    with pytest.raises(ConfigError, match=r"RELAY_PCI_HEALTH_PORT .* differ from RELAY_PCI_PORT"):
        PciSettings.from_env(
            _pci_env(tmp_path, RELAY_PCI_PORT="9000", RELAY_PCI_HEALTH_PORT="9000"),
            insecure_dev=True,
        )


def _merchant_env(tmp_path: Path, secret_file: Path, **extra: str) -> dict[str, str]:
    """A complete merchant-side env with mutual TLS (placeholder PEM files), plus extra."""
    pem = tmp_path / "placeholder.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
    pem.chmod(0o600)  # it stands in for the TLS keys too
    names = [
        "RELAY_MERCHANT_TLS_CERT_FILE",
        "RELAY_MERCHANT_TLS_KEY_FILE",
        "RELAY_MERCHANT_CLIENT_CA_FILE",
        "RELAY_MERCHANT_PCI_TLS_CERT_FILE",
        "RELAY_MERCHANT_PCI_TLS_KEY_FILE",
        "RELAY_MERCHANT_PCI_CA_FILE",
    ]
    return {**credentials_env(secret_file), **dict.fromkeys(names, str(pem)), **extra}


def test_the_ledger_is_a_sqlite_file_by_default(tmp_path: Path, secret_file: Path):
    """Unset, RELAY_MERCHANT_LEDGER_URL is a durable SQLite file in the working directory."""
    settings = MerchantSettings.from_env(_merchant_env(tmp_path, secret_file))
    assert "sqlite:///relay-ledger.db" == settings.merchant.ledger_url.get_secret_value()


@pytest.mark.parametrize(
    "url", ["sqlite:///ledger.db", "sqlite:////var/lib/relay-ledger/ledger.db", "postgresql://db/l"]
)
def test_durable_ledger_urls_are_accepted(tmp_path: Path, secret_file: Path, url: str):
    """SQLite files, relative or absolute, and PostgreSQL DSNs name a ledger."""
    env = _merchant_env(tmp_path, secret_file, RELAY_MERCHANT_LEDGER_URL=url)
    assert url == MerchantSettings.from_env(env).merchant.ledger_url.get_secret_value()


def test_a_memory_ledger_is_refused_outside_insecure_dev(tmp_path: Path, secret_file: Path):
    """memory forgets every token on restart: only --insecure-dev may choose it."""
    env = _merchant_env(tmp_path, secret_file, RELAY_MERCHANT_LEDGER_URL="memory")
    with pytest.raises(ConfigError) as info:
        MerchantSettings.from_env(env)
    expected = (
        "RELAY_MERCHANT_LEDGER_URL=memory forgets every token on restart: use sqlite:///PATH or "
        "a postgresql:// DSN (memory is for --insecure-dev only)"
    )
    assert [expected] == info.value.problems
    settings = MerchantSettings.from_env(env, insecure_dev=True)
    assert "memory" == settings.merchant.ledger_url.get_secret_value()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://cache/0", "must be sqlite:///PATH (sqlite:////ABSOLUTE/PATH), a postgresql://"),
        (
            "sqlite://ledger.db",
            "must be sqlite:///PATH (sqlite:////ABSOLUTE/PATH), a postgresql://",
        ),
        ("sqlite:///:memory:", "must name a file: sqlite:///PATH"),
    ],
)
def test_other_ledger_urls_list_the_accepted_forms(
    tmp_path: Path, secret_file: Path, url: str, problem: str
):
    """A ledger URL of no known form is one problem that says which forms there are."""
    env = _merchant_env(tmp_path, secret_file, RELAY_MERCHANT_LEDGER_URL=url)
    with pytest.raises(ConfigError) as info:
        MerchantSettings.from_env(env, insecure_dev=True)
    assert 1 == len(info.value.problems)
    assert problem in info.value.problems[0]
    assert url not in str(info.value)
