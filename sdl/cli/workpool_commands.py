"""``sdl deploy``, ``sdl worker`` and ``sdl submit``: campaigns on a Prefect work pool.

Every command needs ``PREFECT_API_URL`` (a Prefect server, e.g. ``sdl ui``). Bad input is one line
on stderr and a non-zero exit, before anything is written or queued: ``sdl submit`` validates the
campaign itself (a campaign that fails validation never reaches a worker), ``sdl worker`` checks
the Prefect API and the repository before it starts. Exit codes: 1 the Prefect API, the database or
the deployment is not there, 2 bad input (the campaign file).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["register"]


def _fail(message: str, code: int) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _prefect_api() -> str:
    """PREFECT_API_URL, healthy; otherwise one line and exit 1."""
    from sdl.workpool import WorkpoolError, api_url, check_prefect_api

    try:
        url = api_url()
        check_prefect_api(url)
    except WorkpoolError as exc:
        _fail(str(exc), 1)
    return url


def deploy(
    pool: str = typer.Option("sdl-lab", "--pool", help="Process work pool (created if missing)."),
    name: str = typer.Option("sdl-workpool", "--name", help="Deployment name."),
) -> None:
    """Register the campaign flow as a deployment on a process work pool (run it with `sdl worker`)."""
    _prefect_api()
    from sdl.prefect_server import prepare_client_environment

    prepare_client_environment(Path("sdl-runs"))
    from sdl.workpool import FLOW_NAME, WorkpoolError, deploy_campaign_flow

    try:
        deployment_id = deploy_campaign_flow(pool, name)
    except WorkpoolError as exc:
        _fail(str(exc), 1)
    Console().print(f"deployment [bold]{FLOW_NAME}/{name}[/] ({deployment_id}) on work pool [bold]{pool}[/]\n"
                    f"start workers:    sdl worker --pool {pool} --db URL\n"
                    f"queue campaigns:  sdl submit FILE --db URL", highlight=False)


def worker(
    db: str | None = typer.Option(None, "--db", help="Repository URL the worker checks and its flow runs use "
                                  "when a submission names none (default: SDL_DATABASE_URL)."),
    pool: str = typer.Option("sdl-lab", "--pool", help="Process work pool to take flow runs from."),
    name: str | None = typer.Option(None, "--name", help="Worker name (default: sdl-HOST-PID)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Flow runs this worker runs at once."),
    state_dir: Path = typer.Option(Path("sdl-runs"), "--state-dir",
                                   help="Journals, plots and logs of the flow runs (SDL_STATE_DIR)."),
) -> None:
    """Start a Prefect process worker for the campaign pool; runs until stopped (SIGTERM / Ctrl-C).

    Checks first that the Prefect API and the repository answer (exit 1 naming which does not);
    then it runs Prefect's process worker for the pool (flow runs are subprocesses of it).
    """
    _prefect_api()
    from sdl.settings import settings
    from sdl.workpool import WorkpoolError, check_database, run_worker, worker_environment

    url = db or settings().database_url
    if url:
        try:
            check_database(url)
        except WorkpoolError as exc:
            _fail(str(exc), 1)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(worker_environment(url, state_dir))  # before prefect is imported: it reads them then
    worker_name = name or f"sdl-{socket.gethostname()}-{os.getpid()}"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sdl.workpool").setLevel(logging.INFO)
    Console(stderr=True).print(f"worker {escape(worker_name)} on pool {escape(pool)}", highlight=False)
    run_worker(pool, worker_name, limit)


def submit(
    file: Path = typer.Argument(..., help="Campaign YAML file (workers read it at this absolute path)."),
    db: str | None = typer.Option(None, "--db", help="Repository URL (default: SDL_DATABASE_URL, the YAML's)."),
    deployment: str = typer.Option("sdl-workpool", "--deployment", help="Deployment made by `sdl deploy`."),
    budget: int | None = typer.Option(None, "--budget", min=1, help="Overrides budget.experiments."),
    time_scale: float | None = typer.Option(None, "--time-scale", min=0.0,
                                            help="Simulators' time scale (overrides the YAML)."),
) -> None:
    """Validate a campaign and queue it as a flow run on the work pool; any worker picks it up.

    Submitting a campaign that a dead worker left unfinished resumes it (its stale flow run is
    marked Crashed); one that is running elsewhere is refused by the repository lease in the worker.
    """
    from sdl.config import load_campaign
    from sdl.exceptions import CampaignConfigError, SDLError
    from sdl.lab.instruments import load_driver

    try:
        cfg = load_campaign(file)
    except CampaignConfigError as exc:
        _fail(str(exc), 2)
    if not cfg.instruments:
        _fail(f"{file}: instruments: the campaign lists no instruments, so it cannot be run", 2)
    for inst in cfg.instruments:
        try:
            load_driver(inst.driver, inst.role)
        except SDLError as exc:
            _fail(f"{file}: instruments.{inst.name}.driver: {' '.join(str(exc).split())}", 2)
    _prefect_api()
    from sdl.settings import resolve_database_url
    from sdl.workpool import WorkpoolError, check_database, submit_campaign

    url = resolve_database_url(db, cfg)
    try:
        check_database(url)
    except WorkpoolError as exc:
        _fail(str(exc), 1)
    if cfg.transfer is not None:  # warm-start sources are checked before the run is queued
        from sdl.lab.transfer import check_transfer

        try:
            check_transfer(cfg, url)
        except CampaignConfigError as exc:
            _fail(str(exc), 2)
    from sdl.prefect_server import prepare_client_environment

    prepare_client_environment(Path("sdl-runs"))
    try:
        queued = submit_campaign(file, db_url=url, deployment=deployment, budget=budget, time_scale=time_scale,
                                 campaign=cfg.name)
    except WorkpoolError as exc:
        _fail(str(exc), 1)
    Console().print(f"queued [bold]{escape(cfg.name)}[/]: flow run {queued.flow_run_id} of {queued.deployment}"
                    + (f"\n  {queued.ui_url}" if queued.ui_url else ""), highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``deploy``, ``worker`` and ``submit`` to the sdl app."""
    app.command("deploy")(deploy)
    app.command("worker")(worker)
    app.command("submit")(submit)
