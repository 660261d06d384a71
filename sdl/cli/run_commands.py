"""``sdl run``, ``sdl ui`` and ``sdl serve``: run campaigns, watch them, launch them from the UI.

Prefect is imported inside the commands, after the environment is prepared (its home next to the
database in ephemeral mode, analytics off), because prefect reads its settings at import.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run(
    file: Path = typer.Argument(..., help="Campaign YAML file."),
    db: str | None = typer.Option(None, "--db", help="Repository URL (default: SDL_DATABASE_URL, the YAML, sqlite:///sdl.db)."),
    budget: int | None = typer.Option(None, "--budget", min=1,
                                      help="Experiments to reach an end state (overrides the YAML)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (overrides the YAML)."),
    time_scale: float | None = typer.Option(None, "--time-scale", min=0.0,
                                            help="Simulators' time scale (overrides the YAML)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print Prefect's task logs in the terminal."),
    amend: bool = typer.Option(False, "--amend", help="Accept a YAML that differs from the stored campaign "
                               "of the same name (recorded as an event with the old and new config)."),
) -> None:
    """Run a campaign to its end; rerunning the same campaign on the same database resumes it.

    Exit codes: 0 completed or stopped by a rule, 1 the campaign failed or could not start,
    2 bad input, 3 cancelled (sdl cancel, the Prefect UI), 130 / 143 interrupted by SIGINT / SIGTERM
    (rerun to resume in every case).
    Ctrl-C once: the experiments in flight finish and nothing new starts; twice: they are aborted on
    the instruments and recorded as abandoned.
    """
    from sdl.config import load_campaign
    from sdl.exceptions import CampaignConfigError, SDLError
    from sdl.lab import state_dir_for
    from sdl.lab.interrupts import handle_interrupts
    from sdl.prefect_server import prepare_client_environment
    from sdl.settings import resolve_database_url

    try:
        cfg = load_campaign(file)
    except CampaignConfigError as exc:
        _fail(str(exc))
    if not cfg.instruments:
        _fail(f"{file}: instruments: the campaign lists no instruments, so it cannot be run")
    url = resolve_database_url(db, cfg)
    mode = prepare_client_environment(state_dir_for(url))
    log_file = _log_to_file(state_dir_for(url) / f"{cfg.name}.log", verbose)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    console.print(f"[bold]{cfg.name}[/]: budget {budget or cfg.budget.experiments} experiments, "
                  f"model {cfg.model.name}, repository {_safe(url)}, Prefect {mode}"
                  + (f" ({os.environ['PREFECT_API_URL']})" if mode == "server" else ""), highlight=False)
    from sdl.flows import run_campaign

    try:
        _featurize_candidates(cfg, url, console)
    except SDLError as exc:
        _fail(f"{file}: {exc}", code=1)
    with Progress(
        TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        bar = progress.add_task(cfg.name, total=budget or cfg.budget.experiments, best="")

        def on_progress(info: dict[str, Any]) -> None:
            best = info.get("best_value")
            text = "" if best is None else f"best {cfg.objective.property} = {best:.4g} ({info.get('best_candidate')})"
            progress.update(bar, completed=info["done"], total=info["budget"], best=text)

        with handle_interrupts() as interrupts:
            try:
                summary = run_campaign(file, db_url=url, budget=budget, seed=seed, time_scale=time_scale,
                                       on_progress=on_progress, amend=amend)
            except (SDLError, OSError) as exc:
                progress.stop()
                logger.info("campaign %s did not finish", cfg.name, exc_info=exc)  # the traceback, for the log file
                _fail(f"{file}: campaign {cfg.name}: {_one_line(exc)} (details: {log_file})", code=1)
        progress.update(bar, completed=summary["counts"].get("completed", 0) + summary["counts"].get("failed", 0)
                        + summary["counts"].get("abandoned", 0))
    _print_summary(console, cfg, summary)
    if summary.get("state") == "cancelled" and not interrupts.exit_code:  # sdl cancel, the Prefect UI
        console.print(f"[yellow]cancelled[/]: rerun `sdl run {file}` to resume", highlight=False)
        raise typer.Exit(3)
    if interrupts.exit_code:
        console.print(f"[yellow]interrupted ({interrupts.signal_name})[/]: rerun `sdl run {file}` to resume",
                      highlight=False)
        raise typer.Exit(interrupts.exit_code)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _log_to_file(path: Path, verbose: bool) -> Path:
    """Send every log record (with tracebacks) to ``path``; the terminal gets warnings, without tracebacks.

    Why: a campaign that meets a dead instrument must say so in one line, not in pages of
    tracebacks; the tracebacks are kept for whoever debugs it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"))
    root.addHandler(file_handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # we say what failed, once
        for handler in root.handlers:  # prefect's loggers also propagate to the root
            if handler is not file_handler:
                handler.setLevel(logging.WARNING)
                handler.addFilter(_for_people)
                handler.setFormatter(_NoTraceback("%(levelname)s %(name)s: %(message)s"))
    return path


_TOLD_AT_WARNING = ("sdl.lab.instruments", "sdl.lab.interrupts", "sdl.lab.control", "sdl.lab.approval")


def _for_people(record: logging.LogRecord) -> bool:
    """The warnings a person must act on (an instrument down, an interrupt, a pause, a batch to approve)
    and our own errors.

    Prefect's and the transport's records stay in the log file: the failure itself is said once, at
    the end, by the command.
    """
    if record.name in _TOLD_AT_WARNING:
        return True
    return record.levelno >= logging.ERROR and record.name.startswith("sdl.") and record.name != "sdl.lab.ledger"


class _NoTraceback(logging.Formatter):
    """One line per record: the terminal is for people, the log file for tracebacks."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record).splitlines()[0]
        finally:
            record.exc_info, record.exc_text = saved


def _featurize_candidates(cfg: Any, url: str, console: Any) -> None:
    """Embed a crystal pool with the campaign's pretrained backbone first, with a progress bar.

    The embeddings land in the store beside the repository, so the campaign's engine reads them
    back in about a second; only crystals never seen by this backbone version are computed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sdl.engine import Engine
    from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path

    pretrained = cfg.model.name == "gnn-ensemble" and cfg.model.options.backbone != "scratch"
    if not pretrained or cfg.search_space.candidates is None:
        return
    engine = Engine.from_campaign(cfg, embedding_store=EmbeddingStore(default_store_path(url)))
    with Progress(TextColumn(f"featurising with {cfg.model.options.backbone}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("featurise", total=None)
        engine.prepare(progress=lambda done, total: progress.update(task, completed=done, total=total))
    if engine.excluded:
        console.print(f"[yellow]{cfg.search_space.candidates.file}: {len(engine.excluded)} candidate(s) excluded[/]: "
                      f"the backbone cannot featurise them "
                      f"(first: {next(iter(engine.excluded))!r}: {next(iter(engine.excluded.values()))})",
                      highlight=False)


def _print_summary(console: Any, cfg: Any, summary: dict[str, Any]) -> None:
    counts = summary["counts"]
    unit = cfg.objective.unit or ""
    console.print(f"\n[bold]{summary['campaign']}[/] {summary['state']}: {summary['stop_reason']}", highlight=False)
    console.print(f"  experiments: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed, "
                  f"{counts.get('abandoned', 0)} abandoned (budget {summary['budget']})", highlight=False)
    if summary.get("best_value") is not None:
        console.print(f"  best found:          {cfg.objective.property} = {summary['best_value']:.4g} {unit} "
                      f"({summary['best_candidate']})", highlight=False)
    if summary.get("true_best_value") is not None:
        console.print(f"  best in the world:   {cfg.objective.property} = {summary['true_best_value']:.4g} {unit} "
                      f"({summary['true_best_candidate']})", highlight=False)
    if summary.get("best_world_rank"):
        rank, size = summary["best_world_rank"]
        console.print(f"  rank of best found:  {rank} of {size} recorded values in the world", highlight=False)
    for what, path in summary.get("plots", {}).items():
        console.print(f"  plot {what}: {path}", highlight=False)


def _safe(url: str) -> str:
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def ui(
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port on 127.0.0.1 (0: a free one)."),
    home: Path = typer.Option(Path("sdl-runs/prefect-server"), "--home", help="PREFECT_HOME of the server."),
) -> None:
    """Start a local Prefect server (UI and API) on 127.0.0.1 and print how to report to it."""
    from rich.console import Console

    from sdl.prefect_server import PrefectServer

    console = Console()
    server = PrefectServer(home=home.resolve(), port=port or None)
    try:
        server.start()
    except RuntimeError as exc:
        _fail(f"Prefect server: {exc}", code=1)
    console.print(f"Prefect UI:  [link={server.url}]{server.url}[/link]", highlight=False)
    console.print(f"Report to it from another shell:\n  export PREFECT_API_URL={server.api_url}\n"
                  f"  sdl run campaigns/demo.yaml\nLaunch campaigns from the UI:  sdl serve", highlight=False)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        server.stop()
    raise typer.Exit(code)


def serve(
    name: str = typer.Option("sdl-campaign", "--name", help="Deployment name."),
) -> None:
    """Serve the campaign flow as a deployment (launch campaigns from the UI with a YAML path)."""
    if not os.environ.get("PREFECT_API_URL"):
        _fail("PREFECT_API_URL is not set: start `sdl ui` and export the URL it prints")
    from sdl.prefect_server import prepare_client_environment

    prepare_client_environment(Path("sdl-runs"))
    from sdl.flows import serve_campaigns

    try:
        serve_campaigns(name)
    except KeyboardInterrupt:
        sys.exit(0)


def register(app: typer.Typer) -> None:
    """Add ``run``, ``ui`` and ``serve`` to the sdl app."""
    app.command("run")(run)
    app.command("ui")(ui)
    app.command("serve")(serve)
