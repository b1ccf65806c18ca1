"""Trust-zone boundaries, checked on the AST of every module (STYLE section 1, DESIGN "Packages").

relay imports neither side, the sides never import each other, only relay/flex/jose.py (and
relay/receipts.py, which signs with its own key) imports jwcrypto, `.reveal()` is called only
where card data must leave its type, and library code does not print. Each rule is also run
on a small source that breaks it, so none can pass vacuously.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("relay", "merchant_side", "pci_side")
SIDES = frozenset({"merchant_side", "pci_side"})
JWCRYPTO_IMPORTERS = frozenset({"relay/flex/jose.py", "relay/receipts.py"})
REVEAL_CALLERS = frozenset({"relay/flex/jose.py", "pci_side/vault/envelope.py"})
PRINTING_MODULE_NAMES = frozenset({"cli.py", "demo.py", "bench.py"})
DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})

Rule = Callable[[str, ast.Module], list[str]]


def package_of(path: str) -> str:
    return path.split("/", 1)[0]


def imported_roots(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of each absolute import, including import_module("x")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and _called_name(node) in DYNAMIC_IMPORTERS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value.split(".")[0]


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def calls_to(
    tree: ast.Module, *, attribute: str | None = None, name: str | None = None
) -> list[int]:
    """Lines of calls `X.attribute(...)` (attribute=) or `name(...)` (name=)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (attribute and isinstance(func, ast.Attribute) and func.attr == attribute) or (
            name and isinstance(func, ast.Name) and func.id == name
        ):
            lines.append(node.lineno)
    return lines


def zone_violations(path: str, tree: ast.Module) -> list[str]:
    """relay imports neither side; a side never imports the other."""
    package = package_of(path)
    forbidden = SIDES if package == "relay" else SIDES - {package}
    return [
        f"{path}:{line} imports {root}" for line, root in imported_roots(tree) if root in forbidden
    ]


def jwcrypto_violations(path: str, tree: ast.Module) -> list[str]:
    """Only relay/flex/jose.py and relay/receipts.py import jwcrypto."""
    if path in JWCRYPTO_IMPORTERS:
        return []
    return [
        f"{path}:{line} imports jwcrypto"
        for line, root in imported_roots(tree)
        if root == "jwcrypto"
    ]


def reveal_violations(path: str, tree: ast.Module) -> list[str]:
    """X.reveal() is called only in the two allowed modules."""
    if path in REVEAL_CALLERS:
        return []
    return [f"{path}:{line} calls .reveal()" for line in calls_to(tree, attribute="reveal")]


def print_violations(path: str, tree: ast.Module) -> list[str]:
    """Library code under relay/ logs instead of printing; command modules may print."""
    if package_of(path) != "relay" or Path(path).name in PRINTING_MODULE_NAMES:
        return []
    return [f"{path}:{line} calls print()" for line in calls_to(tree, name="print")]


RULES: dict[str, Rule] = {
    "zones": zone_violations,
    "jwcrypto": jwcrypto_violations,
    "reveal": reveal_violations,
    "print": print_violations,
}


@functools.cache
def load_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            modules[path] = ast.parse(file.read_text(encoding="utf-8"), filename=path)
    return modules


def test_the_walk_sees_the_packages():
    """The checker reads real modules of each package, so the rules below cannot pass on nothing."""
    expected = {
        "relay/flex/jose.py",
        "relay/cli.py",
        "merchant_side/__init__.py",
        "pci_side/__init__.py",
    }
    assert expected == expected & set(load_modules())


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_every_module_keeps_the_rule(rule: Rule):
    """No module under relay/, merchant_side/ or pci_side/ breaks the rule."""
    assert [] == [problem for path, tree in load_modules().items() for problem in rule(path, tree)]


@pytest.mark.parametrize(
    ("rule", "path", "source"),
    [
        ("zones", "relay/flex/client.py", "import merchant_side.sessions\n"),
        ("zones", "relay/cli.py", "from pci_side import server\n"),
        ("zones", "relay/cli.py", "def f():\n    from merchant_side.server import serve\n"),
        ("zones", "relay/cli.py", "import importlib\nimportlib.import_module('pci_side.cli')\n"),
        ("zones", "merchant_side/server.py", "from pci_side.vault import store\n"),
        ("zones", "pci_side/tokenize.py", "import merchant_side\n"),
        ("jwcrypto", "relay/flex/client.py", "from jwcrypto import jwk\n"),
        ("jwcrypto", "pci_side/tokenize.py", "import jwcrypto.jwe\n"),
        ("reveal", "relay/flex/client.py", "digits = card.pan.reveal()\n"),
        ("reveal", "pci_side/vault/store.py", "f(code.reveal())\n"),
        ("reveal", "merchant_side/sessions.py", "x = y().reveal()\n"),
        ("print", "relay/flex/client.py", "print('debug')\n"),
        ("print", "relay/dev/flexsim/app.py", "def f():\n    print(1, file=None)\n"),
    ],
)
def test_each_rule_catches_a_violation(rule: str, path: str, source: str):
    """A source that breaks the rule yields exactly one problem naming the module."""
    problems = RULES[rule](path, ast.parse(source))
    assert [path] == [problem.split(":")[0] for problem in problems]


@pytest.mark.parametrize(
    ("rule", "path", "source"),
    [
        ("zones", "merchant_side/server.py", "import relay.errors\nimport merchant_side.ledger\n"),
        ("zones", "pci_side/server.py", "from relay.flex import jose\nfrom . import tokenize\n"),
        ("jwcrypto", "relay/flex/jose.py", "from jwcrypto import jwe, jwk, jws\n"),
        ("reveal", "relay/flex/jose.py", "digits = card.pan.reveal()\n"),
        ("reveal", "pci_side/vault/envelope.py", "f(card.security_code.reveal())\n"),
        ("reveal", "relay/cards.py", "class Pan:\n    def reveal(self):\n        return 1\n"),
        ("print", "relay/cli.py", "print('relay: bad', file=sys.stderr)\n"),
        ("print", "relay/dev/flexsim/cli.py", "print('listening')\n"),
        ("print", "relay/dev/demo.py", "print('step 1')\n"),
        ("print", "pci_side/cli.py", "print('card_ref')\n"),
        ("print", "relay/flex/client.py", "log.info('print')\n"),
    ],
)
def test_each_rule_allows_what_it_should(rule: str, path: str, source: str):
    """The allow-lists hold: the allowed module, a definition (not a call), a mere mention."""
    assert [] == RULES[rule](path, ast.parse(source))
