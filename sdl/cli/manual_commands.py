"""``sdl ask`` and ``sdl tell``: run the loop by hand (a person at the bench, an instrument without a driver).

Thin over :mod:`sdl.lab.manual`. Output for people goes to stdout (a table, or JSON with
``--json``); progress goes to stderr, so ``sdl ask ... --json > batch.json`` stays clean.
Exit codes: 0 done, 1 the campaign refuses (being run, done, already completed without
``--amend``), 2 bad input (file, value, experiment id, CSV row): one line each, nothing written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from sdl.lab.manual import AskResult, TellResult
    from sdl.repository import CampaignLocked

__all__ = ["register"]

logger = logging.getLogger(__name__)

DB_HELP = "Repository URL (default: $SDL_DATABASE_URL, the YAML's repository.url, sqlite:///sdl.db)."
TELL_DB_HELP = "Repository URL (default: $SDL_DATABASE_URL, else sqlite:///sdl.db)."
BY_HELP = "Who carries the experiments out (default: the operating-system user); recorded with them."


def _die(message: str, code: int) -> NoReturn:
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code=code)


def _locked(exc: CampaignLocked, advice: str) -> str:
    """Who holds the campaign, and what to do: a brief ask/tell passes, sdl run owns it while it runs."""
    if exc.holder and exc.holder.startswith(("sdl ask", "sdl tell")):
        return (f"campaign {exc.campaign!r} is busy with {exc.holder} on host {exc.host} (pid {exc.pid}) "
                "for a few seconds: try again")
    return f"{exc} ({advice})"


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def ask(
    file: Path = typer.Argument(..., help="Campaign YAML file."),
    n: int = typer.Option(1, "-n", "--number", min=1, help="How many experiments to propose."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    by: str | None = typer.Option(None, "--by", help=BY_HELP),
    amend: bool = typer.Option(False, "--amend", help="Accept a YAML that differs from the stored campaign "
                               "of the same name (recorded as an event with the old and new config)."),
) -> None:
    """Propose N experiments to carry out by hand; record them as proposed (tell their results with `sdl tell`).

    The campaign is created on first use, as `sdl run` creates it; asking again never repeats a
    measured or pending experiment; the budget and the stopping rules are the campaign's.
    """
    from sdl.config import load_campaign
    from sdl.exceptions import CampaignConfigError, RepositoryError
    from sdl.lab.manual import CampaignDone, HandInputError, default_teller
    from sdl.lab.manual import ask as ask_for
    from sdl.repository import CampaignConfigChanged, CampaignLocked
    from sdl.settings import resolve_database_url

    try:
        cfg = load_campaign(file)
    except CampaignConfigError as exc:
        _die(str(exc), 2)
    url = resolve_database_url(db, cfg)
    err = _stderr()
    with err.status(f"{cfg.name}: starting") as status:

        def say(message: str) -> None:
            status.update(message)
            err.print(f"[dim]{message}[/]", highlight=False)

        tenth = [-1]

        def featurizing(done: int, total: int) -> None:
            status.update(f"{cfg.name}: featurising candidates {done} / {total}")
            if not err.is_terminal and int(10 * done / max(1, total)) != tenth[0]:  # a log file: every 10 %
                tenth[0] = int(10 * done / max(1, total))
                err.print(f"[dim]{cfg.name}: featurising candidates {done} / {total}[/]", highlight=False)

        try:
            result = ask_for(cfg, url, n, by=by or default_teller(), amend=amend, say=say, featurizing=featurizing)
        except CampaignLocked as exc:
            _die(f"{file}: {_locked(exc, 'ask when it has stopped: a run owns the proposals while it runs')}", 1)
        except CampaignDone as exc:
            _die(f"{file}: {exc}", 1)
        except CampaignConfigChanged as exc:
            _die(f"{file}: {exc}", 2)
        except (HandInputError, RepositoryError) as exc:
            _die(f"{file}: {exc}", 2)
    if as_json:
        typer.echo(json.dumps([a.as_json() for a in result.experiments], indent=2))
    else:
        _print_asked(result)
    if result.note:
        err.print(f"[yellow]note:[/] {result.note}", highlight=False)


def _print_asked(result: AskResult) -> None:
    from rich import box
    from rich.table import Table

    properties = result.properties or {result.property: result.unit}
    table = Table(title=f"{result.campaign}: {len(result.experiments)} experiment(s) to carry out",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("experiment", justify="right")
    table.add_column("what to make")
    for prop, unit in properties.items():
        table.add_column(f"predicted {prop}" + (f" ({unit})" if unit else ""), justify="right")
    table.add_column("acquisition", justify="right")
    table.add_column("model")
    for a in result.experiments:
        what = ", ".join(f"{k}={_short(v)}" for k, v in a.params.items()) or a.candidate
        predicted: dict[str, tuple[float | None, float | None]] = (
            {p: (v.get("mean"), v.get("std")) for p, v in a.predicted.items()} if a.predicted
            else {result.property: (a.predicted_mean, a.predicted_std)})
        cells = []
        for prop in properties:
            mean, std = predicted.get(prop, (None, None))
            cells.append("—" if mean is None else f"{mean:.4g}" + ("" if std is None else f" ± {std:.2g}"))
        table.add_row(str(a.experiment), what, *cells,
                      "—" if a.acquisition_value is None else f"{a.acquisition_value:.3g}", a.model_version or "—")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    console.print(table)
    first = result.experiments[0].experiment
    if len(properties) > 1:
        values = " ".join(f"--value {p}=<V>" for p in properties)
        columns = "experiment," + ",".join(properties)
    else:
        values, columns = f"--value <{result.property}>", "experiment,value"
    console.print(f"tell a result:  sdl tell {result.campaign} --experiment {first} {values}\n"
                  f"many at once:   sdl tell {result.campaign} --csv results.csv  (columns {columns}[,failed])\n"
                  f"budget left after these: {result.remaining}", highlight=False)


def _short(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def tell(
    campaign: str = typer.Argument(..., help="Campaign name (as `sdl status` lists it)."),
    experiment: int | None = typer.Option(None, "--experiment", "-e", help="Experiment id (from `sdl ask`)."),
    value: list[str] | None = typer.Option(None, "--value", help="The measured value of the campaign's objective; "
                                           "with several objectives PROPERTY=V, once per property."),
    failed: str | None = typer.Option(None, "--failed", help="The synthesis failed: the reason, in words."),
    csv_file: Path | None = typer.Option(None, "--csv", help="Many results: a CSV with columns experiment, "
                                         "value (several objectives: one column per property) and/or failed "
                                         "(one of the two per row); all or nothing."),
    db: str | None = typer.Option(None, "--db", help=TELL_DB_HELP),
    by: str | None = typer.Option(None, "--by", help=BY_HELP),
    amend: bool = typer.Option(False, "--amend", help="Replace the value of an experiment already completed "
                               "(the old value stays on record, flagged superseded)."),
) -> None:
    """Complete experiments with what was measured by hand (or mark their synthesis failed)."""
    from sdl.exceptions import RepositoryError
    from sdl.lab.manual import (
        HandInputError,
        campaign_properties,
        default_teller,
        hand_result,
        parse_told,
        read_results_csv,
    )
    from sdl.lab.manual import tell as tell_results
    from sdl.repository import CampaignLocked, HandResult, ResultRefused
    from sdl.settings import resolve_database_url

    values = value or []
    if csv_file is not None:
        if experiment is not None or values or failed is not None:
            _die("--csv and --experiment/--value/--failed exclude each other: give one result or a file", 2)
    else:
        if experiment is None:
            _die("--experiment ID (with --value or --failed) or --csv FILE is needed", 2)
        if bool(values) == (failed is not None):
            _die(f"experiment {experiment}: give --value V or --failed REASON (one of the two)", 2)
        if failed is not None and not failed.strip():
            _die(f"experiment {experiment}: --failed needs a reason in words", 2)
    from sdl.cli.db_commands import _open

    store = _open(resolve_database_url(db))  # a missing or un-migrated repository: one line, exit 1
    store.close()
    try:
        properties = campaign_properties(resolve_database_url(db), campaign)
        if csv_file is not None:
            results = read_results_csv(csv_file, properties)
        else:
            assert experiment is not None
            if values:
                numbers = parse_told(values, properties, f"experiment {experiment}: --value", amend=amend)
                results = [hand_result(experiment, numbers, properties)]
            else:
                results = [HandResult(experiment, failed=str(failed).strip())]
    except HandInputError as exc:
        _die(str(exc), 2)
    try:
        told = tell_results(resolve_database_url(db), campaign, results, by=by or default_teller(), amend=amend)
    except CampaignLocked as exc:
        _die(_locked(exc, "tell its own experiments when it has stopped"), 1)
    except ResultRefused as exc:
        _die(str(exc), 1)
    except (HandInputError, RepositoryError) as exc:
        _die(str(exc), 2)
    _print_told(told)


def _print_told(result: TellResult) -> None:
    unit = f" {result.unit}" if result.unit else ""
    console = Console(soft_wrap=True, highlight=False)
    for o in result.outcomes:
        if o.values:  # several objectives: every property told
            told = ", ".join(f"{p} = {v:g}" + (f" {result.properties[p]}" if result.properties.get(p) else "")
                             + (f" (amended; was {', '.join(f'{w:g}' for w in o.superseded[p]) or 'no value'})"
                                if p in o.superseded else "")
                             for p, v in o.values.items())
            console.print(f"experiment {o.experiment_id} ({o.candidate_key}): {told}"
                          + (", kept on record" if o.superseded else ""))
        elif o.failed is not None:
            console.print(f"experiment {o.experiment_id} ({o.candidate_key}): failed: {o.failed}")
        elif o.amended:
            old = ", ".join(f"{v:g}" for v in o.amended)
            console.print(f"experiment {o.experiment_id} ({o.candidate_key}): {result.property} = {o.value:g}{unit} "
                          f"(amended; was {old}, kept on record)")
        else:
            console.print(f"experiment {o.experiment_id} ({o.candidate_key}): {result.property} = {o.value:g}{unit}")
    if result.note:
        console.print(f"note: {result.note}")
    elif result.state != "running" and result.stop_reason:
        console.print(f"campaign {result.campaign} {result.state}: {result.stop_reason}")
    elif result.stop_reason:
        console.print(f"campaign {result.campaign}: {result.stop_reason}; {result.pending} experiment(s) "
                      "still pending")


def register(app: typer.Typer) -> None:
    """Add ``ask`` and ``tell`` to the sdl app."""
    app.command("ask")(ask)
    app.command("tell")(tell)
