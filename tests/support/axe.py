"""Accessibility checks in the browser tests: axe-core, as bundled by the
PyPI package ``axe-playwright-python`` (no download at run time).

:func:`assert_accessible` runs axe-core on the page as it is now (call it in
every state a test visits: the waiting room, the call, a dialog open) and
fails on any violation of impact "critical" or "serious", naming the rule,
its help text and the first offending elements.
"""

from __future__ import annotations

from typing import Any

from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Page

FAILING_IMPACTS = frozenset({"critical", "serious"})
_AXE = Axe()


def _describe(violation: dict[str, Any]) -> str:
    targets = [str(node.get("target")) for node in violation.get("nodes", [])[:3]]
    impact = violation.get("impact")
    return f"{violation['id']} ({impact}): {violation.get('help')} at {', '.join(targets)}"


async def serious_violations(page: Page) -> list[dict[str, Any]]:
    """Return axe-core's critical and serious violations on ``page`` now."""
    results = await _AXE.run(page)
    violations: list[dict[str, Any]] = results.response.get("violations", [])
    return [v for v in violations if v.get("impact") in FAILING_IMPACTS]


async def assert_accessible(page: Page, state: str = "") -> None:
    """Fail when axe-core finds a critical or serious violation on ``page``.

    ``state`` names what the page shows (for the failure message).
    """
    found = await serious_violations(page)
    where = f"{page.url}{f' ({state})' if state else ''}"
    assert not found, f"axe-core on {where}:\n" + "\n".join(_describe(v) for v in found)
