"""The documentation names every setting the code knows."""

from __future__ import annotations

import pytest

from config import env_var_names
from tests.support import ROOT


@pytest.mark.parametrize(("variable", "setting"), sorted(env_var_names().items()))
def test_configuration_reference_lists_every_setting(variable: str, setting: str) -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    assert f"| `{setting}` | `{variable}` |" in reference
