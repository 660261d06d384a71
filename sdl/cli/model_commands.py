"""CLI commands: placeholder until its issue lands (registers nothing)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the sdl app."""
