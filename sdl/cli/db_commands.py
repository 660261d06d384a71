"""CLI commands over the knowledge repository: ``sdl db upgrade``, ``sdl status``, ``sdl export``.

The database URL is resolved by :func:`sdl.settings.resolve_database_url` (``--db``, then
``SDL_DATABASE_URL``, then ``sqlite:///sdl.db``). Errors print one line and exit 1.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from sdl.repository import Store

__all__ = ["register", "ExportFormat", "unit_headers"]

DB_HELP = "Database URL (default: $SDL_DATABASE_URL, else sqlite:///sdl.db)."


class ExportFormat(StrEnum):
    """File formats of ``sdl export``."""

    csv = "csv"
    json = "json"
    parquet = "parquet"


def _die(message: str) -> NoReturn:
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text.assemble(("ERROR ", "bold red"), message))
    raise typer.Exit(code=1)


def _open(db: str | None, *, must_exist: bool = True) -> Store:
    """Open the repository; a missing SQLite file or an un-migrated database is a clear error."""
    from sqlalchemy.engine import make_url

    from sdl.exceptions import RepositoryError
    from sdl.repository import Store
    from sdl.settings import resolve_database_url

    url = resolve_database_url(db)
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's URL
        _die(f"--db {url!r}: not a database URL ({exc})")
    shown = parsed.render_as_string(hide_password=True)
    if must_exist and parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if path and path != ":memory:" and not Path(path).expanduser().exists():
            _die(f"{shown}: no such database file {path} (run `sdl db upgrade --db {shown}` or `sdl run` first)")
    try:
        store = Store.from_url(url)
        if must_exist and store.current_revision() is None:
            _die(f"{shown}: no sdl schema in this database (run `sdl db upgrade --db {shown}`)")
    except RepositoryError as exc:
        _die(str(exc))
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. connection refused
        _die(f"{shown}: cannot open the database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    return store


def _plain(value: Any) -> Any:
    """JSON/CSV-friendly cell: ISO-8601 UTC times, None for NaN."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def unit_headers(snapshot: dict[str, Any], prop: str | None, columns: list[str]) -> dict[str, str]:
    """Column → header with its unit from the campaign's config, e.g. ``e_form`` → ``e_form [eV]``.

    Why: a CSV opened in a spreadsheet months later must say what its numbers are. The objective's
    unit goes on its column and on the predictions (``predicted_mean``, ``predicted_std``), each
    parameter's ``unit`` on ``param.<name>``; columns without a unit keep their name.
    """
    objective = snapshot.get("objective") or {}
    units: dict[str, str] = {}
    if objective.get("unit"):
        units["predicted_mean"] = units["predicted_std"] = str(objective["unit"])
        if prop in (None, objective.get("property")):
            units[str(objective.get("property"))] = str(objective["unit"])
    for parameter in (snapshot.get("search_space") or {}).get("parameters") or []:
        if parameter.get("unit"):
            units[f"param.{parameter['name']}"] = str(parameter["unit"])
    return {c: f"{c} [{units[c]}]" if c in units else c for c in columns}


def upgrade(db: str | None = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """Create or migrate the knowledge repository to the newest schema."""
    from sdl.exceptions import RepositoryError

    store = _open(db, must_exist=False)
    try:
        before = store.current_revision()
        store.upgrade()
        after = store.current_revision()
    except RepositoryError as exc:
        _die(str(exc))
    finally:
        store.close()
    Console(soft_wrap=True, highlight=False).print(
        Text.assemble(("OK ", "bold green"), f"{store.url}: schema {before or 'empty'} → {after}")
    )


def status(
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """Campaigns in the repository: state, budget, experiments per state, best value."""
    from sdl.exceptions import RepositoryError
    from sdl.repository.control import control_states

    store = _open(db)
    try:
        summaries = store.campaign_summaries()
        shown = control_states(store)  # paused, awaiting approval, cancelled (sdl/repository/control.py)
        summaries = [{**s, "state": shown.get(s["id"], s["state"]), "stored_state": s["state"],
                      **_several_objectives(store, s["id"])} for s in summaries]
    except RepositoryError as exc:
        _die(str(exc))
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([{k: _plain(v) for k, v in s.items()} for s in summaries], indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"Campaigns in {store.url}", box=box.SIMPLE_HEAD, pad_edge=False)
    headers = {"proposed": "prop", "running": "run", "completed": "done", "failed": "fail", "abandoned": "aband"}
    table.add_column("campaign", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("budget", justify="right")
    for header in headers.values():
        table.add_column(header, justify="right")
    table.add_column("best", justify="right", no_wrap=True)
    table.add_column("objective")
    table.add_column("meas", justify="right")
    colours = {"running": "cyan", "completed": "green", "stopped": "yellow", "failed": "red", "paused": "yellow",
               "cancelled": "magenta", "cancelling": "magenta", "awaiting approval": "yellow"}
    goals = {"maximize": "max", "minimize": "min", "target": "target"}
    for s in summaries:
        table.add_row(
            s["name"],
            Text(s["state"], style=colours.get(s["state"], "")),
            "—" if s["budget"] is None else str(s["budget"]),
            *(str(s["counts"][k]) for k in headers),
            "—" if s["best_value"] is None else f"{s['best_value']:.6g}"
            + (f"; front {len(s['pareto_front'])}" if "pareto_front" in s else ""),
            ", ".join(f"{goals.get(o['goal'], o['goal'])} {o['property']}" for o in s["objectives"])
            if "objectives" in s
            else f"{goals.get(s['goal'], s['goal'])} {s['objective']}" if s["objective"] else "—",
            str(s["n_measurements"]),
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    if not summaries:
        console.print(f"No campaigns in {store.url} yet.")
        return
    console.print(table)


def _several_objectives(store: Store, campaign_id: int) -> dict[str, object]:
    """A campaign with ``objectives:``: each objective and goal, the measured front and its hypervolume
    (``best_value`` is the first objective's, as in ``sdl run``'s summary)."""
    from sdl.engine.pareto import MultiObjective
    from sdl.lab.pareto import front_summary

    record = store.get_campaign(campaign_id)
    if record is None or not record.config_snapshot.get("objectives"):
        return {}
    objectives = MultiObjective.from_snapshot(record.config_snapshot)
    return {"objectives": [{"property": o.property, "goal": o.goal} for o in objectives.objectives],
            **front_summary(store, campaign_id, objectives)}


def export(
    campaign: str = typer.Argument(..., help="Campaign name."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", "-f", help="csv, json or parquet."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file (default: stdout)."),
    objective: str | None = typer.Option(None, "--property", help="Measured property (default: the objective)."),
) -> None:
    """Export one row per experiment: state, candidate, material (id, formula), sample, parameters, measured
    objective, provenance."""
    from sdl.exceptions import RepositoryError

    if fmt is ExportFormat.parquet and output is None:
        _die("--format parquet needs an output file (-o FILE)")
    store = _open(db)
    try:
        rows = store.export_rows(campaign, objective)
        record = store.get_campaign(campaign)
        snapshot = record.config_snapshot if record is not None else {}
    except RepositoryError as exc:
        _die(str(exc))
    finally:
        store.close()
    columns = (
        list(rows[0])
        if rows
        else ["experiment_id", "campaign", "state", "candidate_key", "material_id", "formula", "sample_uid"]
    )
    if fmt is ExportFormat.csv:  # a CSV header says the units; JSON and Parquet keep plain names for code
        headers = unit_headers(snapshot, objective, columns)
        rows = [{headers[k]: v for k, v in row.items()} for row in rows]
        columns = [headers[c] for c in columns]
    try:
        if fmt is ExportFormat.parquet:
            import pandas as pd

            assert output is not None
            pd.DataFrame(rows, columns=columns).to_parquet(output, index=False)
        else:
            if fmt is ExportFormat.csv:
                buffer = io.StringIO()
                writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                writer.writerows({k: _plain(v) for k, v in row.items()} for row in rows)
                text = buffer.getvalue()
            else:
                text = json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows], indent=2) + "\n"
            if output is None:
                typer.echo(text, nl=False)
            else:
                output.write_text(text, encoding="utf-8")
    except OSError as exc:
        _die(f"{output}: {exc.strerror or exc}")
    if output is not None:
        Console(stderr=True, soft_wrap=True, highlight=False).print(
            f"{len(rows)} experiment(s) of {campaign!r} written to {output} ({fmt.value})"
        )


def register(app: typer.Typer) -> None:
    """Add ``db upgrade``, ``status`` and ``export`` to the sdl app."""
    db_app = typer.Typer(help="Knowledge repository maintenance.", no_args_is_help=True)
    db_app.command("upgrade")(upgrade)
    app.add_typer(db_app, name="db")
    app.command("status")(status)
    app.command("export")(export)
