"""The tree in audit/errors.py's docstring draws every error the audit package raises."""

from __future__ import annotations

import importlib
import pkgutil
import re

import audit
from audit import errors
from audit.errors import AuditError

TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)\b")


def drawn_tree() -> dict[str, str | None]:
    """Each error the docstring draws, with the one it is drawn under."""
    doc = errors.__doc__ or ""
    # The drawing: from the line naming AuditError to the next blank line.
    drawing = doc[doc.index("    AuditError") :].split("\n\n", 1)[0]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in drawing.splitlines():
        match = TREE_LINE.match(line)
        assert match, f"not a line of the tree: {line!r}"
        depth = len(match["indent"])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[match["name"]] = stack[-1][1] if stack else None
        stack.append((depth, match["name"]))
    return parents


def raised_errors() -> dict[str, str | None]:
    """Each subclass of AuditError in the audit package, with its base."""
    for module in pkgutil.iter_modules(audit.__path__, "audit."):
        importlib.import_module(module.name)
    found: dict[str, str | None] = {"AuditError": None}
    pending = [AuditError]
    while pending:
        base = pending.pop()
        for error in base.__subclasses__():
            if error.__module__.startswith("audit."):
                found[error.__name__] = base.__name__
                pending.append(error)
    return found


def test_the_error_tree_draws_every_audit_error_under_its_base() -> None:
    assert drawn_tree() == raised_errors()
