"""The documentation names every setting the code knows."""

from __future__ import annotations

import re

import pytest

from config import env_var_names
from tests.support import ROOT


@pytest.mark.parametrize(("variable", "setting"), sorted(env_var_names().items()))
def test_configuration_reference_lists_every_setting(variable: str, setting: str) -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    assert f"| `{setting}` | `{variable}` |" in reference


def protocol_reference() -> str:
    return (ROOT / "docs" / "protocol.md").read_text()


def test_protocol_reference_lists_every_close_code_and_no_other() -> None:
    from signaling.protocol import CloseCode

    section = protocol_reference().split("## Close codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", section, re.MULTILINE)}
    assert documented == set(CloseCode)


def test_protocol_reference_lists_every_end_reason_and_no_other() -> None:
    from signaling.protocol import EndReason

    (row,) = [
        line for line in protocol_reference().splitlines() if line.startswith("| `consult-ended`")
    ]
    reasons = row.split("|")[3].removeprefix(" `reason` (")
    assert set(re.findall(r"`([a-z_]+)`", reasons)) == set(EndReason)


def test_protocol_reference_shows_every_recording_state_and_no_other() -> None:
    from signaling.protocol import RecordingState

    shown = re.findall(r'recording \{state: "([a-z]+)"', protocol_reference())
    assert set(shown) == set(RecordingState)
