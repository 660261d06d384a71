"""CLI commands ``sdl validate`` and ``sdl schema``: check campaign files before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["register"]


def validate(
    files: list[Path] = typer.Argument(..., help="Campaign YAML files to check.", show_default=False),
    strict: bool = typer.Option(False, "--strict", help="A data file that is not here is an error (exit 1), "
                                "as it is for `sdl run`."),
) -> None:
    """Validate campaign YAML files: one line per file; exit 0 when all are valid, 1 if any is not.

    A data file (candidate pool, simulator world) that is not in this checkout is a WARN line, not an
    error: the campaign is valid and runs once its data are there (``--strict``: an error).
    """
    from sdl.config import load_campaign, missing_data_files
    from sdl.exceptions import CampaignConfigError

    out = Console(soft_wrap=True, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    failed = 0
    for file in files:
        try:
            cfg = load_campaign(file, require_data=strict)
        except CampaignConfigError as exc:
            failed += 1
            err.print(Text.assemble(("ERROR ", "bold red"), str(exc)))
            continue
        missing = missing_data_files(cfg)
        for field, line, path in missing:
            where = f"{file}:{line} {field}" if line else f"{file} {field}"
            err.print(Text.assemble(("WARN ", "bold yellow"), f"{where}: data file not in this checkout "
                                    f"(looked for {path}); `sdl run` needs it"))
        if cfg.search_space.candidates is not None:
            space = f"candidates from {cfg.search_space.candidates.file.name}"
        else:
            count = len(cfg.search_space.parameters or [])
            space = f"{count} parameter{'s' if count != 1 else ''}"
        goals = " and ".join(f"{o.goal} {o.property}" for o in cfg.all_objectives)
        if cfg.constraints:
            goals += f" with {', '.join(map(str, cfg.constraints))}"
        function = cfg.acquisition.function if cfg.objectives is None or len(cfg.objectives) == 1 else "qlognehvi"
        summary = (
            f"{file}: campaign {cfg.name!r}, {space}, {goals}, "
            f"model {cfg.model.name}, {function} q={cfg.acquisition.batch_size}, "
            f"budget {cfg.budget.experiments}, {len(cfg.instruments)} instruments, hash {cfg.config_hash()[:12]}"
        )
        if missing:
            summary += f" (schema only: {len(missing)} data file{'s' if len(missing) > 1 else ''} missing)"
        out.print(Text.assemble(("OK ", "bold green"), summary))
    if failed:
        raise typer.Exit(code=1)


def schema(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the schema to this file."),
) -> None:
    """Print the JSON Schema of campaign YAML files (for editor completion)."""
    from sdl.config import campaign_json_schema

    text = json.dumps(campaign_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        Console(stderr=True, soft_wrap=True).print(Text.assemble(("ERROR ", "bold red"), f"{output}: {exc.strerror}"))
        raise typer.Exit(code=1) from None
    Console(soft_wrap=True, highlight=False).print(Text.assemble(("OK ", "bold green"), f"schema written to {output}"))


def register(app: typer.Typer) -> None:
    """Add ``validate`` and ``schema`` to the sdl app."""
    app.command("validate")(validate)
    app.command("schema")(schema)
