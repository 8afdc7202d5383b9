"""Subcommands of the ``warmstart`` command line (registered in :data:`warmstart.cli.COMMANDS`)."""

from __future__ import annotations

import sys


def out(text: str = "") -> None:
    """Write a line of command output to stdout."""
    sys.stdout.write(text + "\n")
