"""A server that cannot serve as configured says why and exits 2, before it takes any traffic.

Real `relay pci serve` processes on loopback: a port already in use (by another relay or by any
listener), a TLS key that does not belong to its certificate, a KEK file that lacks a version
the vault uses or holds another key under it, and key files other users may read. The key-pair
checks in relay.tlsfiles are also tested directly, and so is grpc's own refusal now that
SO_REUSEPORT is off (without that, a second server on the same port would start and share the
traffic).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pci_side.vault import open_vault
from relay.config import VaultSettings
from relay.dev import tlsgen
from relay.dev.procs import Child
from relay.errors import ConfigError
from relay.serving import bind_problem, new_server
from relay.tlsfiles import check_ca_bundle, check_key_pair
from tests.integration.pci_rig import write_receipt_key
from tests.vault_backends import generated_cards, make_vault_config, vault_env

EXIT_TIMEOUT = 30.0
"""A generous bound on a refusing process's exit; it normally takes well under a second."""
IN_USE = "the address is already in use"
UNUSED_FLEX_URL = "http://127.0.0.1:9"
"""Flex is never called by a server that refuses to start, nor by one that only listens."""


@pytest.fixture(scope="module")
def pki() -> tuple[tlsgen.Issued, tlsgen.Issued]:
    """A test CA and a server certificate for 127.0.0.1 it issued."""
    ca = tlsgen.new_ca("startup failures CA")
    return ca, tlsgen.issue_server(ca, ("localhost", "127.0.0.1"))


@pytest.fixture
def pci_env(pki: tuple[tlsgen.Issued, tlsgen.Issued], tmp_path: Path) -> dict[str, str]:
    """The environment of a `relay pci serve` on port 0 with mutual TLS and a new SQLite vault."""
    ca, server = pki
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    cert_file, key_file = server.write(tmp_path, "server")
    vault = make_vault_config(f"sqlite:///{tmp_path / 'vault.db'}", tmp_path)
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    return inherited | {
        "RELAY_PCI_HOST": "127.0.0.1",
        "RELAY_PCI_PORT": "0",
        "RELAY_PCI_DRAIN_SECONDS": "1",
        "RELAY_PCI_TLS_CERT_FILE": str(cert_file),
        "RELAY_PCI_TLS_KEY_FILE": str(key_file),
        "RELAY_PCI_CLIENT_CA_FILE": str(ca_file),
        "RELAY_PCI_RECEIPT_KEY_FILE": str(write_receipt_key(tmp_path)),
        "RELAY_FLEX_BASE_URL": UNUSED_FLEX_URL,
        **vault_env(vault, tmp_path),
    }


async def run_to_exit(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """Run `relay ARGS` until it exits by itself; its exit code and its stderr lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), EXIT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the server kept running instead of refusing to start", pytrace=False)
    assert process.returncode is not None
    return process.returncode, stderr.decode("utf-8", errors="replace").splitlines()


def refusal(code: int, lines: list[str]) -> tuple[int, list[str]]:
    """The exit code and the stderr lines that are not JSON log lines (the CLI's own message)."""
    return code, [line for line in lines if not line.startswith("{")]


def refused_with(message: str) -> tuple[int, list[str]]:
    """What refusal() gives for a ConfigError: exit 2 and its one line, nothing else."""
    return 2, [f"relay: invalid configuration: {message}"]


# --- a port in use --------------------------------------------------------------------------


async def test_a_second_pci_server_on_a_port_in_use_exits_2_saying_so(
    pci_env: dict[str, str],
) -> None:
    """A second `pci serve` on the port the first listens on exits 2 naming the address in use."""
    first = await Child.start("pci", ["pci", "serve"], ready_event="pci_listening", env=pci_env)
    try:
        port = int(first.ready.result()["port"])
        code, lines = await run_to_exit(pci_env, "pci", "serve", "--port", str(port))
    finally:
        first_code = await first.stop()
    assert refused_with(f"cannot listen on 127.0.0.1:{port}: {IN_USE}") == refusal(code, lines)
    assert 0 == first_code, first.lines[-3:]


async def test_a_pci_server_on_a_port_a_plain_socket_holds_exits_2_saying_so(
    pci_env: dict[str, str], occupied_port: int
) -> None:
    """A port any other listener holds is refused the same way: exit 2, address, in use."""
    code, lines = await run_to_exit(pci_env, "pci", "serve", "--port", str(occupied_port))
    expected = refused_with(f"cannot listen on 127.0.0.1:{occupied_port}: {IN_USE}")
    assert expected == refusal(code, lines)


async def test_a_health_port_in_use_exits_2_naming_the_health_listener(
    pci_env: dict[str, str], occupied_port: int
) -> None:
    """The plaintext health listener refuses a port in use too, and says it was the health one."""
    env = pci_env | {"RELAY_PCI_HEALTH_PORT": str(occupied_port)}
    code, lines = await run_to_exit(env, "pci", "serve")
    expected = refused_with(f"cannot listen on 127.0.0.1:{occupied_port} (health): {IN_USE}")
    assert expected == refusal(code, lines)


async def test_grpc_refuses_a_second_server_on_the_same_port() -> None:
    """With SO_REUSEPORT off, grpc itself fails to bind a port another of our servers holds."""
    first, second = new_server(), new_server()
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        with pytest.raises(RuntimeError):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await first.stop(None)
        # A server that never started cannot be stopped, and grpc logs it from __dealloc__ with
        # the object as a log argument; caplog keeping that record crashes the interpreter
        # later. Started (with no port) and stopped, it is freed quietly.
        await second.start()
        await second.stop(None)


def test_bind_problem_gives_the_os_reason(occupied_port: int) -> None:
    """A port in use, an address not on this machine, and a free port each get their answer."""
    assert (IN_USE, "the address is not one of this machine's", None) == (
        bind_problem("127.0.0.1", occupied_port),
        bind_problem("192.0.2.1", 0),  # TEST-NET-1: never assigned to a host
        bind_problem("127.0.0.1", 0),
    )


# --- a TLS key that is not the certificate's --------------------------------------------------


async def test_a_tls_key_not_matching_its_certificate_exits_2_naming_both_files(
    pci_env: dict[str, str], pki: tuple[tlsgen.Issued, tlsgen.Issued], tmp_path: Path
) -> None:
    """A key from another certificate exits 2 with "does not match", the files and no key bytes."""
    ca, _ = pki
    _, other_key = tlsgen.issue_server(ca).write(tmp_path, "other")
    env = pci_env | {"RELAY_PCI_TLS_KEY_FILE": str(other_key)}
    code, lines = await run_to_exit(env, "pci", "serve")
    # One line and nothing before it: the files are checked before the vault is opened.
    assert (2, 1) == (code, len(lines)), lines
    assert refused_with(
        "the TLS key RELAY_PCI_TLS_KEY_FILE (other.key) does not match its certificate "
        "RELAY_PCI_TLS_CERT_FILE (server.crt)"
    ) == refusal(code, lines)


async def test_a_tls_key_that_is_not_pem_exits_2_naming_the_file(
    pci_env: dict[str, str], tmp_path: Path
) -> None:
    """A key file holding no PEM key is named as such, not reported as a port problem."""
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n", encoding="utf-8")
    junk.chmod(0o600)
    code, lines = await run_to_exit(pci_env | {"RELAY_PCI_TLS_KEY_FILE": str(junk)}, "pci", "serve")
    assert refused_with(
        "the TLS key RELAY_PCI_TLS_KEY_FILE (junk.key) is not a PEM private key"
    ) == refusal(code, lines)


# --- the KEK file and secret file modes ------------------------------------------------------


async def seed_and_replace_keyring(env: dict[str, str], lines: str) -> Path:
    """Import a card under the env's keyring (version 1), then replace the file with lines."""
    async with await open_vault(VaultSettings.from_env(env).vault) as vault:
        await vault.import_cards(generated_cards(1, merchants=("m1",)))
    path = Path(env["RELAY_VAULT_KEK_FILE"])
    path.write_text(lines, encoding="ascii")
    path.chmod(0o600)
    return path


def new_key_line(version: int) -> str:
    return f"{version}:{base64.b64encode(os.urandom(32)).decode()}\n"


@pytest.mark.parametrize("args", [("pci", "serve"), ("cards", "list")], ids=["serve", "cards"])
async def test_a_kek_file_without_a_version_in_use_exits_2_naming_version_and_file(
    pci_env: dict[str, str], args: tuple[str, ...]
) -> None:
    """Cards under version 1, a keyring holding only 2: exit 2, the version, the file, no trace."""
    path = await seed_and_replace_keyring(pci_env, new_key_line(2))
    code, lines = await run_to_exit(pci_env, *args)
    assert refused_with(
        f"RELAY_VAULT_KEK_FILE ({path}) has no version 1, which the vault's cards are sealed "
        "under: restore it"
    ) == refusal(code, lines)
    assert [] == [line for line in lines if "Traceback" in line]


async def test_a_wrong_key_under_a_version_in_use_exits_2_and_never_says_tampering(
    pci_env: dict[str, str],
) -> None:
    """Another key under version 1: exit 2 with the wrong-key message."""
    path = await seed_and_replace_keyring(pci_env, new_key_line(1))
    code, lines = await run_to_exit(pci_env, "pci", "serve")
    assert refused_with(
        f"the key for version 1 in RELAY_VAULT_KEK_FILE ({path}) is not the key the vault was "
        "sealed with"
    ) == refusal(code, lines)


@pytest.mark.parametrize("variable", ["RELAY_VAULT_KEK_FILE", "RELAY_PCI_TLS_KEY_FILE"])
async def test_a_key_file_others_may_read_exits_2_saying_chmod_600(
    pci_env: dict[str, str], variable: str
) -> None:
    """A 0644 KEK file or TLS key: exit 2 naming the setting and the path, and how to fix it."""
    path = pci_env[variable]
    Path(path).chmod(0o644)
    code, lines = await run_to_exit(pci_env, "pci", "serve")
    assert refused_with(
        f"{variable} ({path}) may be read or written by other users (mode 0644): chmod 600 {path}"
    ) == refusal(code, lines)


# --- relay.tlsfiles --------------------------------------------------------------------------


def test_a_certificate_and_its_own_key_pass(pki: tuple[tlsgen.Issued, tlsgen.Issued]) -> None:
    """The key a certificate was issued for matches it."""
    _, server = pki
    check_key_pair(server.cert_pem, server.key_pem, cert_name="c", key_name="k")


def test_a_chain_file_is_matched_by_its_first_certificate(
    pki: tuple[tlsgen.Issued, tlsgen.Issued],
) -> None:
    """A certificate followed by its CA (a chain file) matches the leaf's key, not the CA's."""
    ca, server = pki
    chain = server.cert_pem + ca.cert_pem
    check_key_pair(chain, server.key_pem, cert_name="c", key_name="k")
    with pytest.raises(ConfigError, match="does not match"):
        check_key_pair(chain, ca.key_pem, cert_name="c", key_name="k")


def test_another_key_does_not_match(pki: tuple[tlsgen.Issued, tlsgen.Issued]) -> None:
    """A key of the same kind but another certificate's is refused, naming both and no key."""
    ca, server = pki
    other = tlsgen.issue_server(ca)
    with pytest.raises(ConfigError) as caught:
        check_key_pair(
            server.cert_pem, other.key_pem, cert_name="CERT (s.crt)", key_name="KEY (o.key)"
        )
    assert ["the TLS key KEY (o.key) does not match its certificate CERT (s.crt)"] == (
        caught.value.problems
    )


def test_a_key_of_another_algorithm_does_not_match(
    pki: tuple[tlsgen.Issued, tlsgen.Issued],
) -> None:
    """An RSA key against an EC certificate is a mismatch, not a crash."""
    _, server = pki
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ConfigError, match="does not match"):
        check_key_pair(server.cert_pem, pem_of(rsa_key), cert_name="c", key_name="k")


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("cert_is_junk", "the TLS certificate c is not a PEM certificate"),
        ("key_is_junk", "the TLS key k is not a PEM private key"),
        ("key_is_a_certificate", "the TLS key k is not a PEM private key"),
        ("key_is_encrypted", "the TLS key k is encrypted: grpc needs an unencrypted PEM key"),
    ],
)
def test_unparseable_files_are_named(
    pki: tuple[tlsgen.Issued, tlsgen.Issued], which: str, expected: str
) -> None:
    """A file that is not what it should be gets a message naming it and saying what is wrong."""
    _, server = pki
    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    cert, key = {
        "cert_is_junk": (b"junk", server.key_pem),
        "key_is_junk": (server.cert_pem, b"junk"),
        "key_is_a_certificate": (server.cert_pem, server.cert_pem),
        "key_is_encrypted": (server.cert_pem, encrypted),
    }[which]
    with pytest.raises(ConfigError) as caught:
        check_key_pair(cert, key, cert_name="c", key_name="k")
    assert [expected] == caught.value.problems


def test_a_ca_bundle_must_hold_certificates(pki: tuple[tlsgen.Issued, tlsgen.Issued]) -> None:
    """A CA bundle of certificates passes; one holding a key instead is named."""
    ca, _ = pki
    check_ca_bundle(ca.cert_pem, name="ca")
    with pytest.raises(ConfigError) as caught:
        check_ca_bundle(ca.key_pem, name="CA (ca.crt)")
    assert ["the TLS CA file CA (ca.crt) is not a PEM certificate bundle"] == caught.value.problems


def pem_of(key: rsa.RSAPrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM of key."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
