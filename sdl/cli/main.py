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
    generate_commands,
    import_commands,
    manual_commands,
    model_commands,
    run_commands,
    simulate_commands,
    workpool_commands,
)

app = typer.Typer(
    name="sdl",
    help="Self-driving materials laboratory: run, watch and query closed-loop campaigns.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    """``sdl --version``: the installed distribution's version (package metadata)."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("sdl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from sdl import __version__ as found
    typer.echo(f"sdl {found}")
    raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Self-driving materials laboratory: run, watch and query closed-loop campaigns."""


for _module in (
    config_commands,
    db_commands,
    simulate_commands,
    model_commands,
    run_commands,
    manual_commands,
    benchmark_commands,
    generate_commands,
    control_commands,
    import_commands,
    workpool_commands,
):
    _module.register(app)


def main() -> None:
    """Run the CLI (console script ``sdl``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
