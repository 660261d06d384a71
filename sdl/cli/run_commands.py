"""``sdl run``, ``sdl ui`` and ``sdl serve``: run campaigns, watch them, launch them from the UI.

Prefect is imported inside the commands, after the environment is prepared (its home next to the
database in ephemeral mode, analytics off), because prefect reads its settings at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from sdl.steps import UPDATE

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from sdl.config import CampaignConfig
    from sdl.lab.interrupts import Interrupts

__all__ = ["register"]

logger = logging.getLogger(__name__)


_LIVE: list[Console] = []  # the stderr console of a live progress row, while one is shown


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    console = _LIVE[-1] if _LIVE else Console(stderr=True)  # above a live row, not through it
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
    dask: str | None = typer.Option(None, "--dask", metavar="ADDRESS", help="Featurise and score the candidate "
                                    "pool on this Dask scheduler (tcp://host:8786) or 'local' (a LocalCluster); "
                                    "overrides the YAML's compute.dask."),
) -> None:
    """Run a campaign to its end; rerunning the same campaign on the same database resumes it.

    Exit codes: 0 completed or stopped by a rule, 1 the campaign failed or could not start,
    2 bad input, 3 cancelled (sdl cancel, the Prefect UI), 130 / 143 interrupted by SIGINT / SIGTERM
    (rerun to resume in every case).
    Ctrl-C once: the experiments in flight finish and nothing new starts; twice: they are aborted on
    the instruments and recorded as abandoned.
    """
    from rich.console import Console

    err = Console(stderr=True)
    _LIVE.append(err)
    with _progress(err) as progress, contextlib.ExitStack() as stack:
        stack.callback(_LIVE.remove, err)
        bar = progress.add_task(file.stem, total=None, best="", step="")
        steps = _StepDisplay(progress, bar)
        with steps:
            try:
                summary, cfg, interrupts = _run_with_progress(file, db, budget, seed, time_scale, verbose, amend,
                                                              progress, bar, dask)
            except typer.Exit:
                progress.update(bar, visible=False)  # the error line says what happened
                raise
    _print_summary(Console(), cfg, summary)
    if summary.get("state") == "cancelled" and not interrupts.exit_code:  # sdl cancel, the Prefect UI
        Console().print(f"[yellow]cancelled[/]: rerun `sdl run {file}` to resume", highlight=False)
        raise typer.Exit(3)
    if interrupts.exit_code:
        Console().print(f"[yellow]interrupted ({interrupts.signal_name})[/]: rerun `sdl run {file}` to resume",
                        highlight=False)
        raise typer.Exit(interrupts.exit_code)


def _run_with_progress(file: Path, db: str | None, budget: int | None, seed: int | None, time_scale: float | None,
                       verbose: bool, amend: bool, progress: Progress, bar: TaskID, dask: str | None = None,
                       ) -> tuple[dict[str, Any], CampaignConfig, Interrupts]:
    """The body of ``sdl run``: every slow step is announced (``sdl.steps``) while it happens."""
    from sdl.steps import step

    step("loading the campaign %s", file)
    from sdl.config import load_campaign
    from sdl.exceptions import CampaignConfigError, SDLError

    try:
        cfg = load_campaign(file)
    except CampaignConfigError as exc:
        _fail(str(exc))
    if not cfg.instruments:
        _fail(f"{file}: instruments: the campaign lists no instruments, so it cannot be run")
    if dask is not None:
        _use_dask(dask)
    total = budget or cfg.budget.experiments
    progress.update(bar, description=cfg.name, total=total)
    step("loading the lab (Bluesky, Ophyd, the repository)")
    from sdl.lab import state_dir_for
    from sdl.lab.interrupts import handle_interrupts
    from sdl.prefect_server import prepare_client_environment
    from sdl.settings import resolve_database_url

    url = resolve_database_url(db, cfg)
    if cfg.transfer is not None:  # warm-start sources are checked before anything runs
        from sdl.lab.transfer import check_transfer

        step("checking the transfer sources in the repository")
        try:
            check_transfer(cfg, url)
        except CampaignConfigError as exc:
            _fail(str(exc))
    mode = prepare_client_environment(state_dir_for(url))
    log_file = _log_to_file(state_dir_for(url) / f"{cfg.name}.log", verbose)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    from rich.console import Console

    # In a terminal the header goes above the live row (stdout would cut through it); piped, to stdout.
    out = progress.console if progress.console.is_terminal else Console()
    out.print(f"[bold]{cfg.name}[/]: budget {total} experiments, "
                    f"model {cfg.model.name}, repository {_safe(url)}, Prefect {mode}"
                    + (f" ({os.environ['PREFECT_API_URL']})" if mode == "server" else ""), highlight=False)
    step("loading Prefect and the engine (torch, BoTorch)")
    from sdl.flows import run_campaign

    try:
        _featurize_candidates(cfg, url, progress.console)
    except SDLError as exc:
        _fail(f"{file}: {exc}", code=1)

    def on_progress(info: dict[str, Any]) -> None:
        best = info.get("best_value")
        text = "" if best is None else f"best {cfg.objective.property} = {best:.4g} ({info.get('best_candidate')})"
        last = info.get("last") or {}
        progress.update(bar, completed=info["done"], total=info["budget"], best=text,
                        step=f"last: {last.get('key')} {last.get('state')}" if last else "")

    step("starting the Prefect flow run" + (" (an ephemeral Prefect server: its first start takes 10-20 s)"
                                            if mode == "ephemeral" else ""))
    with handle_interrupts() as interrupts:
        try:
            summary = run_campaign(file, db_url=url, budget=budget, seed=seed, time_scale=time_scale,
                                   on_progress=on_progress, amend=amend)
        except (SDLError, OSError) as exc:
            progress.stop()
            logger.info("campaign %s did not finish", cfg.name, exc_info=exc)  # the traceback, for the log file
            _fail(f"{file}: campaign {cfg.name}: {_one_line(exc)} (details: {log_file})", code=1)
    counts = summary["counts"]
    progress.update(bar, completed=counts.get("completed", 0) + counts.get("failed", 0) + counts.get("abandoned", 0),
                    step="")
    return summary, cfg, interrupts


def _use_dask(address: str) -> None:
    """Check a ``--dask`` scheduler now (one line and exit 1 if it does not answer), then hand it to the engine."""
    from sdl.engine.distributed import check_address
    from sdl.exceptions import EngineError
    from sdl.settings import DASK_ADDRESS_ENV
    from sdl.steps import step

    step("checking the Dask scheduler %s", address)
    try:
        check_address(address)
    except EngineError as exc:
        _fail(f"--dask {address}: {exc}", code=1)
    os.environ[DASK_ADDRESS_ENV] = address  # the campaign flow runs in this process and builds its engine here


def _progress(console: Console) -> Progress:
    """One progress row on stderr (a terminal only): spinner, campaign, bar, best so far, the current step."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(), TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[best]}"), TextColumn("[dim]{task.fields[step]}"),
        console=console, transient=False, disable=not console.is_terminal,
    )


class _StepDisplay(logging.Handler):
    """Shows the ``sdl.steps`` records: each new step as a line with its start time, updates in the row.

    Why lines and not only the row: a step shorter than a refresh would never be seen, and the
    lines say afterwards where the start-up time went.
    """

    def __init__(self, progress: Progress, bar: TaskID) -> None:
        super().__init__(logging.INFO)
        self.progress = progress
        self.bar = bar
        self.started = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.progress.console.is_terminal:
            return  # piped or captured: the log file has every step; stderr stays for what went wrong
        try:
            message = record.getMessage()
            if not getattr(record, UPDATE, False):
                self.progress.console.print(f"[dim]{time.monotonic() - self.started:6.1f} s[/]  {escape(message)}",
                                            highlight=False)
            self.progress.update(self.bar, step=message)
        except Exception:  # noqa: BLE001 - a display problem must never stop a campaign
            self.handleError(record)

    def __enter__(self) -> _StepDisplay:
        from sdl.steps import STEP_LOGGER

        steps = logging.getLogger(STEP_LOGGER)
        steps.addHandler(self)
        steps.setLevel(logging.INFO)
        for handler in logging.getLogger().handlers:  # the terminal's log handler shows warnings, not steps
            handler.addFilter(_not_a_step)
        return self

    def __exit__(self, *exc: object) -> None:
        from sdl.steps import STEP_LOGGER

        logging.getLogger(STEP_LOGGER).removeHandler(self)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(_not_a_step)


def _not_a_step(record: logging.LogRecord) -> bool:
    return not (record.name == "sdl.steps" and record.levelno < logging.WARNING)


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
    """Embed a crystal pool with the campaign's pretrained backbone first, announcing its progress.

    The embeddings land in the store beside the repository, so the campaign's engine reads them
    back in about a second; only crystals never seen by this backbone version are computed.
    """
    from sdl.engine import Engine
    from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path
    from sdl.steps import step

    pretrained = cfg.model.name == "gnn-ensemble" and cfg.model.options.backbone != "scratch"
    if not pretrained or cfg.search_space.candidates is None:
        return
    backbone = cfg.model.options.backbone
    step("reading the candidate pool %s", cfg.search_space.candidates.file.name)
    engine = Engine.from_campaign(cfg, embedding_store=EmbeddingStore(default_store_path(url)))
    size = len(engine.pool) if engine.pool is not None else 0
    step("loading the %s backbone, featurising %d crystals (cached embeddings are read back)", backbone, size)
    shown = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 0.5 or done >= total:  # a few updates a second, not one per crystal
            shown[0] = now
            step("featurising %d crystals with %s: %d / %d", total, backbone, done, total, update=True)

    engine.prepare(progress=report)
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
        for line in rank_against_random(rank, size, counts.get("completed", 0)):
            console.print(f"  {line}", highlight=False)
    if "pareto_front" in summary:  # several objectives: the measured front, not one best value
        front = summary["pareto_front"]
        console.print(f"  Pareto front:        {len(front)} measured candidate(s), hypervolume "
                      f"{summary['hypervolume']:.4g}", highlight=False)
        for row in front[:10]:
            values = ", ".join(f"{k} = {v:.4g}" for k, v in row.items() if k not in ("candidate", "experiment"))
            console.print(f"    {row['candidate']}: {values}", highlight=False)
    for what, path in summary.get("plots", {}).items():
        console.print(f"  plot {what}: {path}", highlight=False)


def rank_against_random(rank: int, size: int, measured: int) -> list[str]:
    """The best found's rank in the world, in words, beside random search's expectation for the same budget.

    Why: "rank 4 of 400" means little until one knows that random search with 32 experiments
    reaches rank ~12 on average (the analytic expectation, :mod:`sdl.benchmark_metrics`).
    """
    from sdl.benchmark_metrics import random_best_rank_at_most, random_expected_best_rank

    share = 100.0 * rank / size
    where = "the best recorded value" if rank == 1 else f"top {share:.2g} %"
    lines = [f"rank of best found:  {rank} of {size} recorded values in the world ({where})"]
    if 1 <= measured <= size:
        expected = random_expected_best_rank(size, measured)
        chance = 100.0 * random_best_rank_at_most(size, measured, rank)
        shown = f"{expected:.0f}" if expected >= 10 else f"{expected:.1f}"
        as_good = "rank 1" if rank == 1 else f"rank {rank} or better"
        lines.append(f"random search:       with {measured} experiments, rank ~{shown} on average; "
                     f"{as_good} in {_percent(chance)} of campaigns")
        if rank < expected * 0.8:
            verdict = f"better than random search's average (rank {rank} vs ~{shown})"
        elif rank > expected * 1.25:
            verdict = f"worse than random search's average (rank {rank} vs ~{shown})"
        else:
            verdict = f"about random search's average (rank {rank} vs ~{shown})"
        lines.append(f"verdict:             {verdict}")
    return lines


def _percent(value: float) -> str:
    if value >= 99.5:
        return "over 99 %" if value < 100.0 else "100 %"
    return f"{value:.0f} %" if value >= 10 else f"{value:.2g} %"


def _safe(url: str) -> str:
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def ui(
    host: str | None = typer.Option(None, "--host", help="Interface to listen on (default 127.0.0.1; anything "
                                    "else only when given here: the Prefect UI and API have no login)."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port (0: a free one)."),
    home: Path = typer.Option(Path("sdl-runs/prefect-server"), "--home", help="PREFECT_HOME of the server."),
) -> None:
    """Start a local Prefect server (UI and API) and print how to report to it; runs until stopped.

    As a service (systemd, docker): SIGTERM or SIGINT stops the server and everything it started,
    then exits 0. Exit codes: 1 the server did not start, 2 bad input (an unsafe host from the
    environment).
    """
    import signal

    from rich.console import Console

    from sdl.prefect_server import PrefectServer, UnsafeHost, resolve_ui_host

    try:
        listen = resolve_ui_host(host)
    except UnsafeHost as exc:
        _fail(str(exc))
    console = Console()
    server = PrefectServer(home=home.resolve(), port=port or None, host=listen)
    if host and not server.loopback:
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who reaches this port can read and run "
                      "campaigns (the Prefect server has no login)", highlight=False)

    def stop_on(signum: int, frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        try:
            server.start()
        except RuntimeError as exc:
            _fail(f"Prefect server: {exc}", code=1)
        console.print(f"Prefect UI:  [link={server.url}]{server.url}[/link]", highlight=False)
        console.print(f"Report to it from another shell:\n  export PREFECT_API_URL={server.api_url}\n"
                      f"  sdl run campaigns/demo.yaml\nLaunch campaigns from the UI:  sdl serve", highlight=False)
        code = server.wait()
    except _Stop as stop:
        console.print(f"{stop}: stopping the Prefect server", highlight=False)
    finally:
        for sig in previous:  # a second signal must not cut the stop short (it is bounded)
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    raise typer.Exit(code)


class _Stop(Exception):
    """SIGTERM / SIGINT reached ``sdl ui``: stop the server (a normal end for a service)."""


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
