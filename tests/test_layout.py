"""The architecture's rules, checked on the source: dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("config", "audit", "signaling", "server")
# server → signaling → audit → config; server may also use audit directly.
ALLOWED = {
    "config": set(),
    "audit": {"config"},
    "signaling": {"audit", "config"},
    "server": {"signaling", "audit", "config"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    assert modules_of(package), f"{package}/ has no modules"
    for module in modules_of(package):
        ours = imported_top_levels(module) & set(PACKAGES) - {package}
        forbidden = ours - ALLOWED[package]
        assert not forbidden, f"{module.relative_to(ROOT)} imports {sorted(forbidden)}"


@pytest.mark.parametrize("package", ["config", "audit"])
def test_lower_layers_import_no_web_framework(package: str) -> None:
    for module in modules_of(package):
        assert "aiohttp" not in imported_top_levels(module), module.relative_to(ROOT)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# signaling/ by concept: the room's state model and the ports are pure, the
# one-node implementations need no Redis, and the Redis codec only parses
# and serialises; none of them needs the web framework or a database.
SIGNALING_WITHOUT_CLIENTS = [
    "signaling/state.py",
    "signaling/ports.py",
    "signaling/subscribers.py",
    "signaling/inprocess.py",
    "signaling/redis/codec.py",
]


@pytest.mark.parametrize("module", SIGNALING_WITHOUT_CLIENTS)
def test_state_ports_and_in_process_kind_need_no_redis_web_or_database(module: str) -> None:
    clients = {"redis", "aiohttp", "sqlalchemy", "aiortc"}
    assert not imported_top_levels(ROOT / module) & clients


@pytest.mark.parametrize(
    "module",
    [
        "signaling/rooms.py",
        "signaling/deadlines.py",
        "signaling/recovery.py",
        "signaling/changes.py",
        "signaling/recording.py",
    ],
)
def test_rooms_work_through_the_ports_not_an_implementation(module: str) -> None:
    implementations = {"signaling.inprocess", "signaling.redis"}
    imported = imported_modules(ROOT / module)
    chosen = {name for name in imported for kind in implementations if name.startswith(kind)}
    assert not chosen, f"{module} imports {sorted(chosen)}"


# A module a reader can hold in their head: one concept each (the issue that
# split signaling/ and server/ws/ by job set the bound). Migrations are frozen
# history and stay as they were written.
MOST_LINES = 600


@pytest.mark.parametrize("package", ["server", "signaling", "audit", "config"])
def test_no_module_is_longer_than_its_concept_needs(package: str) -> None:
    too_long = {
        str(module.relative_to(ROOT)): lines
        for module in modules_of(package)
        if "migrations" not in module.parts
        and (lines := len(module.read_text().splitlines())) > MOST_LINES
    }
    assert not too_long, f"over {MOST_LINES} lines: {too_long}"
