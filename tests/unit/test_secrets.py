"""Secret[T]: masked in every rendering, never serialized, compared by value; secret files.

read_secret_file refuses a file others may read or write, except group-read by the group
RELAY_SECRET_FILES_GROUP names (Kubernetes secret volumes); the settings use it for every file.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import structlog

from relay.config import VaultSettings
from relay.errors import ConfigError
from relay.secrets import MASK, Secret, read_secret_file

KEY = b"\x00\x01not-a-real-key"


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """A config object holding a key, as STYLE leak 7 describes."""

    client_private_key: Secret[bytes]


def test_secret_renders_the_mask_every_way():
    """repr, str, f-strings, %s, str.format, json default=str and JSONRenderer print the mask."""
    secret = Secret(KEY)
    renderings = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret:>40}",
        "%s" % secret,  # noqa: UP031  %-formatting is one of the renderings under test
        "{}".format(secret),  # noqa: UP032  str.format is one of the renderings under test
        json.loads(json.dumps(secret, default=str)),
        json.loads(structlog.processors.JSONRenderer()(None, "info", {"k": secret}))["k"],
    ]
    assert ["Secret(**********)"] * len(renderings) == renderings


def test_the_mask_does_not_depend_on_the_value():
    """Short, long and non-bytes secrets render identically, so the length is not shown either."""
    renderings = {repr(Secret(value)) for value in (b"", b"x" * 4096, "text", 42)}
    assert {f"Secret({MASK})"} == renderings


def test_a_dataclass_holding_a_secret_prints_the_mask():
    """A plain dataclass repr shows the Secret field masked (STYLE leak 7)."""
    assert "TLSConfig(client_private_key=Secret(**********))" == repr(TLSConfig(Secret(KEY)))


def test_get_secret_value_returns_the_value():
    """get_secret_value() is the one way to get the value back."""
    value = Secret(KEY).get_secret_value()
    assert KEY == value


@pytest.mark.parametrize(
    "serialize",
    [pickle.dumps, copy.copy, copy.deepcopy, json.dumps],
    ids=["pickle", "copy", "deepcopy", "json"],
)
def test_serializing_a_secret_is_refused(serialize):
    """pickle, copy, deepcopy and plain json.dumps raise TypeError."""
    with pytest.raises(TypeError):
        serialize(Secret(KEY))


def test_asdict_of_a_dataclass_holding_a_secret_is_refused():
    """dataclasses.asdict deep-copies its fields, so a Secret field makes it raise."""
    with pytest.raises(TypeError) as info:
        dataclasses.asdict(TLSConfig(Secret(KEY)))
    assert "Secret is not serializable" == str(info.value)


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (Secret(KEY), Secret(KEY), True),
        (Secret(KEY), Secret(KEY + b"!"), False),
        (Secret("shared"), Secret("shared"), True),
        (Secret("shared"), Secret("Shared"), False),
        (Secret("shared"), Secret(b"shared"), False),
        (Secret(7), Secret(7), True),
        (Secret(7), Secret(8), False),
    ],
    ids=[
        "same_bytes",
        "different_bytes",
        "same_str",
        "different_str",
        "str_vs_bytes",
        "same_int",
        "different_int",
    ],
)
def test_secrets_compare_by_value(left, right, expected):
    """Two Secrets are equal when their values are equal and of the same type."""
    assert expected == (left == right)


def test_a_secret_never_equals_its_bare_value():
    """A Secret is not equal to the value it wraps."""
    assert (False, True) == (Secret(KEY) == KEY, Secret(KEY) != KEY)


def test_secrets_hash_by_identity():
    """Equal secrets are distinct as hash keys: a secret is never meant as one."""
    first, second = Secret(KEY), Secret(KEY)
    assert (True, 2) == (hash(first) == hash(first), len({id(first): first, id(second): second}))


def test_secrets_with_non_ascii_text_compare():
    """A non-ASCII str secret (a passphrase) compares instead of raising TypeError."""
    assert Secret("pässwörd") == Secret("pässwörd")


# --- Secret files -----------------------------------------------------------------------------


def secret_file(directory: Path, mode: int, data: bytes = KEY) -> Path:
    """A file holding data with exactly mode (whatever the umask)."""
    path = directory / f"secret-{mode:04o}"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_a_private_file_is_read(tmp_path: Path) -> None:
    """A 0600 file is read whole."""
    assert KEY == read_secret_file(secret_file(tmp_path, 0o600), "RELAY_X_FILE")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_file_others_may_read_or_write_is_refused_saying_how_to_fix_it(
    tmp_path: Path, mode: int
) -> None:
    """Any group or other bit refuses the file, naming setting and path, with `chmod 600`."""
    path = secret_file(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        read_secret_file(path, "RELAY_X_FILE")
    expected = (
        f"RELAY_X_FILE ({path}) may be read or written by other users (mode {mode:04o}): "
        f"chmod 600 {path}"
    )
    assert [expected] == info.value.problems
    assert KEY.decode("latin-1") not in str(info.value)


def test_group_read_is_accepted_only_for_the_secret_files_group(tmp_path: Path) -> None:
    """0640 passes when group names the file's group, and not for another group or none."""
    path = secret_file(tmp_path, 0o640)
    gid = path.stat().st_gid
    assert KEY == read_secret_file(path, "RELAY_X_FILE", group=gid)
    for group in (None, gid + 1):
        with pytest.raises(ConfigError, match="chmod 600"):
            read_secret_file(path, "RELAY_X_FILE", group=group)


@pytest.mark.parametrize("mode", [0o660, 0o644, 0o641], ids=["group-write", "other-read", "x"])
def test_the_secret_files_group_never_allows_group_write_or_any_other_bit(
    tmp_path: Path, mode: int
) -> None:
    """Even the secret files group may not write the file, and "other" gets nothing."""
    path = secret_file(tmp_path, mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret_file(path, "RELAY_X_FILE", group=path.stat().st_gid)


def test_a_missing_file_names_setting_and_path(tmp_path: Path) -> None:
    """A file that cannot be opened is a ConfigError naming the setting and the path."""
    path = tmp_path / "absent"
    with pytest.raises(ConfigError) as info:
        read_secret_file(path, "RELAY_X_FILE")
    assert [f"RELAY_X_FILE ({path}) cannot be read"] == info.value.problems


def vault_env(directory: Path, mode: int) -> dict[str, str]:
    """RELAY_VAULT_* naming a KEK file and a fingerprint key file of mode, the rest 0600."""
    key = base64.b64encode(os.urandom(32))
    files = {
        "RELAY_VAULT_URL_FILE": (b"sqlite:///vault.db", 0o600),
        "RELAY_VAULT_KEK_FILE": (b"1:" + key, mode),
        "RELAY_VAULT_FINGERPRINT_KEY_FILE": (key, mode),
        "RELAY_VAULT_AUDIT_KEY_FILE": (os.urandom(32), 0o600),
    }
    env = {}
    for name, (data, file_mode) in files.items():
        path = directory / name.lower()
        path.write_bytes(data)
        path.chmod(file_mode)
        env[name] = str(path)
    return env


def test_settings_refuse_loose_key_files_naming_each(tmp_path: Path) -> None:
    """VaultSettings refuses a 0644 KEK file and fingerprint key file, one problem each."""
    env = vault_env(tmp_path, 0o644)
    with pytest.raises(ConfigError) as info:
        VaultSettings.from_env(env)
    named = [
        (name, f"chmod 600 {env[name]}" in problem)
        for problem in info.value.problems
        for name in ("RELAY_VAULT_KEK_FILE", "RELAY_VAULT_FINGERPRINT_KEY_FILE")
        if problem.startswith(f"{name} (")
    ]
    assert [("RELAY_VAULT_KEK_FILE", True), ("RELAY_VAULT_FINGERPRINT_KEY_FILE", True)] == named


def test_settings_take_group_readable_files_with_the_secret_files_group(tmp_path: Path) -> None:
    """0640 files pass with RELAY_SECRET_FILES_GROUP set to their group, and the vault keeps it."""
    env = vault_env(tmp_path, 0o640)
    gid = Path(env["RELAY_VAULT_KEK_FILE"]).stat().st_gid
    with pytest.raises(ConfigError, match="chmod 600"):
        VaultSettings.from_env(env)
    settings = VaultSettings.from_env(env | {"RELAY_SECRET_FILES_GROUP": str(gid)})
    assert gid == settings.vault.secret_files_group


def test_a_secret_files_group_that_is_no_gid_is_a_problem(tmp_path: Path) -> None:
    """RELAY_SECRET_FILES_GROUP must be numeric; the problem names the variable."""
    env = vault_env(tmp_path, 0o600) | {"RELAY_SECRET_FILES_GROUP": "relay"}
    with pytest.raises(ConfigError) as info:
        VaultSettings.from_env(env)
    assert ["RELAY_SECRET_FILES_GROUP must be a numeric group id"] == info.value.problems
