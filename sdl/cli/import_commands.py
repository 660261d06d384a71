"""``sdl import-results``: file a CSV of earlier results into a campaign's experiments, all or nothing.

Thin over :mod:`sdl.repository.imports`. Exit codes: 0 stored, 1 the repository or the campaign
refuses (unknown campaign, ``sdl run`` holds it), 2 bad input (file, line): one line each,
nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["register"]

DB_HELP = "Repository URL (default: $SDL_DATABASE_URL, else sqlite:///sdl.db)."


def _die(message: str, code: int) -> NoReturn:
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code=code)


def import_results(
    campaign: str = typer.Argument(..., help="Campaign name (as `sdl status` lists it)."),
    csv_file: Path = typer.Option(..., "--csv", help="CSV with columns experiment (or candidate) and value; "
                                  "optional property, unit, uncertainty, instrument, quality, timestamp."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Import earlier results as measurements of a campaign's experiments (one transaction for the file)."""
    from sdl.cli.db_commands import _open
    from sdl.exceptions import RepositoryError
    from sdl.repository import CampaignLocked
    from sdl.repository.imports import ImportInputError
    from sdl.repository.imports import import_results as run_import

    store = _open(db)  # a missing or un-migrated repository: one line, exit 1
    try:
        summary = run_import(store, campaign, csv_file)
    except ImportInputError as exc:
        _die(str(exc), 2)
    except CampaignLocked as exc:
        _die(f"{csv_file}: {exc} (import when the run has stopped)", 1)
    except RepositoryError as exc:
        message = str(exc)
        _die(message, 1 if message.startswith("no campaign named") else 2)
    finally:
        store.close()
    shown = ", ".join(f"{n} {prop}" for prop, n in sorted(summary.properties.items()))
    Console(soft_wrap=True, highlight=False).print(
        f"{summary.measurements} measurement(s) of {summary.experiments} experiment(s) imported into "
        f"{summary.campaign!r} from {summary.path} ({shown})"
    )


def register(app: typer.Typer) -> None:
    """Add ``import-results`` to the sdl app."""
    app.command("import-results")(import_results)
