"""Secret[T]: masked in every rendering, never serialized, compared by value."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import structlog

from relay.secrets import MASK, Secret

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
