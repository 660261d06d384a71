"""``sdl generate``: new candidate crystals by ionic substitution into the structures of a table.

Thin layer over :mod:`sdl.generation`: reads the tables, shows a progress bar, writes the
candidates CSV (``id``, ``formula``, ``cif`` and the predicted values; a campaign YAML takes it as
``search_space.candidates.file``). Bad input (a missing file or column) is one line and exit 1
with nothing written; unreadable rows are named in one summary line.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    """Add ``sdl generate`` to the sdl app."""

    @app.command("generate")
    def generate_command(
        source: Path = typer.Option(..., "--from", help="Table (CSV/CSV.gz) of known crystals to substitute into."),
        out: Path = typer.Option(..., "--out", help="Candidates CSV to write (.csv or .csv.gz)."),
        n: int = typer.Option(..., "--n", min=1, help="Candidates wanted."),
        structure_column: str = typer.Option("cif", "--structure-column", help="Column with CIF text."),
        id_column: str = typer.Option("id", "--id-column", help="Column with a unique id per row."),
        energy_column: str | None = typer.Option(
            None, "--energy-column",
            help="Formation energy per atom (eV/atom) of each row: the hull uses it (CHGNet corrected onto it); "
                 "without it the hull is on CHGNet's scale.",
        ),
        reference: Path | None = typer.Option(
            None, "--reference", help="More known phases (same columns) for the hull and the duplicate check."
        ),
        energy: str = typer.Option("relax", "--energy", help="relax (CHGNet StructOptimizer), static or none."),
        score_top: int | None = typer.Option(
            None, "--score-top", min=1, help="Most probable unique candidates that get a CHGNet energy (default 2n)."
        ),
        threshold: float = typer.Option(1e-3, "--threshold", help="Lowest substitution probability."),
        relax_steps: int = typer.Option(200, "--relax-steps", min=1, help="Most optimiser steps per relaxation."),
        workers: int = typer.Option(1, "--workers", min=1, help="Processes (one thread each)."),
        max_rows: int | None = typer.Option(None, "--max-rows", min=1, help="Read only the first rows of --from."),
    ) -> None:
        """Generate N charge-balanced, de-duplicated candidates ranked by CHGNet energy above the hull."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

        from sdl.generation import GenerationError
        from sdl.generation.pipeline import GenerationOptions, generate
        from sdl.generation.sources import read_known

        err = Console(stderr=True, soft_wrap=True)
        console = Console()
        if energy not in ("relax", "static", "none"):
            err.print(f"--energy: expected relax, static or none, got {energy!r}", markup=False)
            raise typer.Exit(1)
        if not out.parent.exists():
            err.print(f"--out: folder {out.parent} does not exist", markup=False)
            raise typer.Exit(1)
        try:
            parents = read_known(source, structure_column=structure_column, id_column=id_column,
                                 energy_column=energy_column, max_rows=max_rows)
            known = None
            if reference is not None:
                known = read_known(reference, structure_column=structure_column, id_column=id_column,
                                   energy_column=energy_column)
            options = GenerationOptions(n=n, energy=energy, score_top=score_top,  # type: ignore[arg-type]
                                        threshold=threshold, relax_steps=relax_steps, workers=workers)
        except (GenerationError, ValueError) as exc:
            err.print(str(exc), markup=False)
            raise typer.Exit(1) from None
        if not parents.ids:
            err.print(f"{source}: no row with a readable structure in column {structure_column!r}", markup=False)
            raise typer.Exit(1)
        labels = {"substitute": "substituting", "build": "building + de-duplicating",
                  "energy": f"CHGNet ({energy})", "known": "CHGNet (known phases)"}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=False) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(stage: str, advance: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
                bar.update(tasks[stage], advance=advance)

            result = generate(parents, options, reference=known, progress=progress)
        if result.skipped:
            ids = ", ".join(sorted(result.skipped))
            err.print(f"skipped {len(result.skipped)} row(s) of {source.name} (unreadable CIF or no oxidation "
                      f"states): {ids}", markup=False, soft_wrap=True)
        if not result.candidates:
            err.print(f"{source}: no new candidate could be generated; nothing written", markup=False)
            raise typer.Exit(1)
        result.write_csv(out)
        console.print(
            f"wrote {len(result.candidates)} candidates to {out} ({result.n_substitutions} substitutions, "
            f"{result.n_unique} unique, {result.n_scored} scored, hull on the {result.hull_scale} scale, "
            f"{result.seconds:.1f} s)", markup=False, soft_wrap=True,
        )
        if result.shortfall:
            console.print(result.shortfall, markup=False)
