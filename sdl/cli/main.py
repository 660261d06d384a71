"""Entry point of the ``sdl`` console script.

Each command group lives in its own module with a ``register(app)`` function, so
that the modules stay small and import their heavy dependencies only when a
command runs.
"""

from __future__ import annotations

import logging

import typer

from sdl.cli import (
    benchmark_commands,
    config_commands,
    control_commands,
    db_commands,
    model_commands,
    run_commands,
    simulate_commands,
)

app = typer.Typer(
    name="sdl",
    help="Self-driving materials laboratory: run, watch and query closed-loop campaigns.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _module in (
    config_commands,
    db_commands,
    simulate_commands,
    model_commands,
    run_commands,
    benchmark_commands,
    control_commands,
):
    _module.register(app)


def main() -> None:
    """Run the CLI (console script ``sdl``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
