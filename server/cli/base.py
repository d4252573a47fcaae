"""What every command module shares: the error type and the command contract.

A command module exposes ``register(subparsers)``, which adds its parser and
sets ``run=`` to a function ``(settings, args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from config import Settings

Run = Callable[[Settings, argparse.Namespace], int]


class CliError(Exception):
    """A command failed in a way the user can fix; the message says how."""


class CommandModule(Protocol):
    def register(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Add this module's command (and its subcommands) to ``subparsers``."""
