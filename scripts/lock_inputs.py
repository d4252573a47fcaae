"""Print the digest of everything the lock files in requirements/ are made from.

``./scripts/lock`` writes it into each lock file, and tests/test_lock.py
compares: a lock whose digest differs was made from another pyproject.toml
(or another requirements/*.in) and is stale. Only what changes the resolution
counts (requires-python, the build system's, the project's and the extras'
requirements, the .in files' requirement lines), so editing a comment in
pyproject.toml does not make the lock stale.

Usage: python3 scripts/lock_inputs.py [ROOT]
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements .in file, comments and blanks dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text("utf-8").splitlines())
    return [line for line in lines if line]


def inputs_digest(root: Path) -> str:
    """SHA-256 over a canonical JSON of the lock's inputs below ``root``."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text("utf-8"))
    project = pyproject["project"]
    inputs = {
        "requires-python": project.get("requires-python", ""),
        "build-system": pyproject.get("build-system", {}).get("requires", []),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "in-files": {
            path.name: requirement_lines(path)
            for path in sorted((root / "requirements").glob("*.in"))
        },
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


if __name__ == "__main__":
    print(inputs_digest(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent))
