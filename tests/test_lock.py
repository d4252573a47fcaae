"""The lock files in requirements/ agree with pyproject.toml, and .venv holds them.

``./scripts/lock`` makes requirements/{runtime,test,bench}.txt with uv and
writes into each the digest of what it was made from (scripts/lock_inputs.py).
These tests read the files only (no package index is asked): a lock made from
another pyproject.toml fails here, and so does a pin outside its range, a pin
without hashes, or a version that differs between the sets.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import ROOT

REQUIREMENTS = ROOT / "requirements"
LOCKS = ("runtime", "test", "bench")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
# A pin: "name==version ; marker" with its "--hash=" options, joined from its
# backslash-continued lines.
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)\s*(?:;\s*(?P<marker>.+?))?\s*$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self) -> bool:
        """Whether this pin is for the Python and platform running the tests."""
        return self.marker is None or self.marker.evaluate()


def read_lock(name: str) -> list[Pin]:
    text = (REQUIREMENTS / f"{name}.txt").read_text("utf-8").replace("\\\n", " ")
    pins = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        head, *options = line.split(" --")
        match = PIN.match(head.strip())
        assert match, f"requirements/{name}.txt: not an exact pin: {line.strip()[:120]!r}"
        pins.append(
            Pin(
                name=canonicalize_name(match["name"]),
                version=Version(match["version"]),
                marker=Marker(match["marker"]) if match["marker"] else None,
                hashes=tuple(o.split()[0] for o in options if o.startswith("hash=")),
            )
        )
    return pins


def applicable(name: str) -> dict[str, Version]:
    """The versions of a lock that pip installs here."""
    versions: dict[str, Version] = {}
    for pin in read_lock(name):
        if pin.applies():
            assert pin.name not in versions, f"{name}.txt pins {pin.name} twice for this Python"
            versions[pin.name] = pin.version
    return versions


def in_file_requirements(name: str) -> list[str]:
    lines = (
        line.split("#", 1)[0].strip()
        for line in (REQUIREMENTS / name).read_text("utf-8").splitlines()
    )
    return [line for line in lines if line]


def inputs_of(lock: str) -> list[str]:
    """What pyproject.toml and requirements/*.in ask of one lock."""
    inputs = [
        *PYPROJECT["build-system"]["requires"],
        *PYPROJECT["project"]["dependencies"],
        *in_file_requirements("tools.in"),
    ]
    if lock in ("test", "bench"):
        inputs += PYPROJECT["project"]["optional-dependencies"]["test"]
    if lock == "bench":
        inputs += in_file_requirements("bench.in")
    return inputs


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_was_made_from_the_current_pyproject(lock: str) -> None:
    digest = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock_inputs.py"), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    header = (REQUIREMENTS / f"{lock}.txt").read_text("utf-8").splitlines()[:5]
    assert f"# inputs-sha256: {digest}" in header, (
        f"requirements/{lock}.txt is stale: pyproject.toml or requirements/*.in changed "
        "since it was made. Run ./scripts/lock and commit requirements/ with pyproject.toml."
    )


@pytest.mark.parametrize("lock", LOCKS)
def test_every_requirement_is_pinned_within_its_range(lock: str) -> None:
    versions = applicable(lock)
    for text in inputs_of(lock):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in versions, f"requirements/{lock}.txt has no pin for {text!r}"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={versions[name]}, outside {text!r}"
        )


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_carries_hashes(lock: str) -> None:
    pins = read_lock(lock)
    assert len(pins) > 20, f"requirements/{lock}.txt holds only {len(pins)} pins"
    for pin in pins:
        assert pin.hashes, f"requirements/{lock}.txt: {pin.name} has no --hash"
        assert all(h.startswith("hash=sha256:") for h in pin.hashes), pin


@pytest.mark.parametrize(("smaller", "larger"), [("runtime", "test"), ("test", "bench")])
def test_each_set_keeps_the_versions_of_the_one_it_extends(smaller: str, larger: str) -> None:
    small, large = applicable(smaller), applicable(larger)
    differ = {name: (v, large.get(name)) for name, v in small.items() if large.get(name) != v}
    assert not differ, f"{larger}.txt pins these unlike {smaller}.txt: {differ}"


def test_the_virtualenv_holds_exactly_the_test_lock() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not running in the project's .venv (sys.prefix is {sys.prefix})")
    locked = applicable("test")
    installed: dict[str, Version] = {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version)
        for dist in importlib.metadata.distributions(path=sys.path)
    }
    wrong = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not wrong, f"locked version, installed version: {wrong}"
    # A developer may add tools by hand (the bench set); CI's venv is new and exact.
    unlocked = set(installed) - set(locked) - {"videoconsult"}
    if os.environ.get("CI") == "true":
        assert not unlocked, f"installed but not in requirements/test.txt: {sorted(unlocked)}"
