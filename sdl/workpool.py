"""Campaigns on a Prefect work pool: deploy the campaign flow once, start workers, queue campaigns.

Why a work pool: a lab with several robots, campaigns or groups needs more than one ``sdl run`` in
a terminal. ``sdl deploy`` registers :func:`sdl.flows.campaign_flow` on a *process* work pool (its
entrypoint is the module path ``sdl.flows.campaign_flow``, so a worker loads it from the installed
package: no image, no remote storage); ``sdl worker`` runs Prefect's ``ProcessWorker`` for that pool
with the project's settings; ``sdl submit`` validates a campaign and queues a flow run of the
deployment that any worker picks up. Two flow runs of one campaign never run at once: the second
one is refused by the repository lease (:meth:`sdl.repository.Store.acquire_lease`) and fails with
the one line that names the holder.

A worker that dies takes its flow runs with it only when their processes die too (Prefect 3.8.8
starts each flow run in its own session); Prefect then leaves the run ``Running`` (the open-source
server has no zombie detection). ``sdl submit`` of the same campaign queues a new flow run that
resumes it: the dead runner's lease is taken over at once on the same host (its pid is gone) and
after its heartbeat is 30 s old elsewhere, and the stale flow run is marked ``Crashed``.

Plain functions; prefect is imported inside them, after the caller prepared the environment
(:func:`sdl.prefect_server.prepare_client_environment`).
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from uuid import UUID

from sdl.exceptions import SDLError

__all__ = [
    "DEFAULT_DEPLOYMENT",
    "DEFAULT_POOL",
    "FLOW_NAME",
    "QueuedCampaign",
    "WorkpoolError",
    "check_database",
    "check_prefect_api",
    "deploy_campaign_flow",
    "ensure_work_pool",
    "mark_stale_runs_crashed",
    "submit_campaign",
    "run_worker",
    "worker_environment",
]

logger = logging.getLogger(__name__)

FLOW_NAME = "sdl-campaign"
"""The campaign flow's name (``sdl.flows.campaign_flow``)."""
DEFAULT_POOL = "sdl-lab"
DEFAULT_DEPLOYMENT = "sdl-workpool"


class WorkpoolError(SDLError):
    """The Prefect API, the database or the work pool is not usable; ``str(err)`` is one line."""


@dataclass(frozen=True)
class QueuedCampaign:
    """A flow run queued by :func:`submit_campaign`."""

    flow_run_id: UUID
    flow_run_name: str
    deployment: str
    ui_url: str | None


def api_url() -> str:
    """``PREFECT_API_URL``; a work pool needs a Prefect server (``sdl ui``), not ephemeral mode.

    Raises:
        WorkpoolError: The variable is not set.
    """
    url = (os.environ.get("PREFECT_API_URL") or "").strip()
    if not url:
        raise WorkpoolError("PREFECT_API_URL is not set: a work pool needs a Prefect server "
                            "(start `sdl ui` and export the URL it prints)")
    return url.rstrip("/")


def check_prefect_api(url: str, timeout_s: float = 10.0) -> None:
    """Fail in one line when the Prefect API at ``url`` does not answer ``/health``.

    Raises:
        WorkpoolError: Unreachable or unhealthy, naming the URL.
    """
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise WorkpoolError(f"Prefect API {url} is unreachable ({problem}): start `sdl ui` or fix PREFECT_API_URL")


def check_database(url: str) -> None:
    """Fail in one line when the repository at ``url`` cannot be reached (one ``SELECT 1``).

    Raises:
        WorkpoolError: Unreachable, naming the URL with its password hidden.
    """
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError as exc:
        raise WorkpoolError(f"database URL {url!r} is not a SQLAlchemy URL: {exc}") from exc
    engine = None
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (SQLAlchemyError, ImportError) as exc:
        first = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise WorkpoolError(f"database {shown} is unreachable: {first[:300]}") from exc
    finally:
        if engine is not None:
            engine.dispose()


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool ``name`` unless it exists; True when it was created.

    Raises:
        WorkpoolError: A pool of that name exists with another type.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   description="sdl campaigns (sdl worker runs them)"))
            logger.info("work pool %s created (process)", name)
            return True
    if pool.type != "process":
        raise WorkpoolError(f"work pool {name!r} is of type {pool.type!r}, not 'process': pick another --pool")
    return False


def deploy_campaign_flow(pool: str, name: str = DEFAULT_DEPLOYMENT) -> UUID:
    """Register the campaign flow as deployment ``name`` on the process pool ``pool`` (made if missing).

    The entrypoint is the module path, so any worker with ``sdl`` installed runs it; redeploying
    updates the deployment in place.
    """
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    from sdl.flows import campaign_flow

    ensure_work_pool(pool)
    deployment = cast(RunnerDeployment, campaign_flow.to_deployment(  # sync context: not a coroutine
        name=name, work_pool_name=pool, tags=["sdl"], entrypoint_type=EntrypointType.MODULE_PATH,
        description="Run or resume a campaign from its YAML path (queued by `sdl submit`).",
    ))
    deployment_id = cast(UUID, deployment.apply(work_pool_name=pool))
    logger.info("deployment %s/%s on pool %s: %s", FLOW_NAME, name, pool, deployment_id)
    return deployment_id


def mark_stale_runs_crashed(campaign: str, deployment: str) -> list[UUID]:
    """Mark the deployment's ``Running`` flow runs of ``campaign`` whose process is gone as ``Crashed``.

    Why: Prefect 3.8.8 leaves a flow run ``Running`` for ever when its worker and process die
    (no zombie detection in the open-source server). Only runs whose infrastructure pid no longer
    exists on *this* host are touched; a run on another host is left alone (its lease says more).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    marked: list[UUID] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[campaign]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
        )
        for run in runs:
            pid = _local_pid(run.infrastructure_pid)
            if pid is None or _alive(pid):
                continue
            client.set_flow_run_state(run.id, Crashed(message=f"its process (pid {pid}) is gone: "
                                                      "the worker died; resumed by a new flow run"), force=True)
            marked.append(run.id)
    return marked


def _local_pid(infrastructure_pid: str | None) -> int | None:
    """The pid of an ``infrastructure_pid`` that names a process on this host (``pid`` or ``host:pid``)."""
    if not infrastructure_pid:
        return None
    host, _, pid = infrastructure_pid.rpartition(":")
    if host and host != socket.gethostname():
        return None
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (an orphan whose worker died may wait unreaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): it exists
    return state != "Z"


def submit_campaign(config_path: Path, *, db_url: str | None, deployment: str = DEFAULT_DEPLOYMENT,
                    budget: int | None = None, time_scale: float | None = None,
                    campaign: str | None = None) -> QueuedCampaign:
    """Queue a flow run of the campaign deployment for ``config_path`` (already validated by the caller).

    The parameters are the YAML's absolute path (workers read it there: one machine or a shared
    file system; paths inside it resolve against its directory) and the repository URL.

    Raises:
        WorkpoolError: The deployment does not exist (run ``sdl deploy`` first).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    full_name = f"{FLOW_NAME}/{deployment}"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(full_name)
        except ObjectNotFound:
            raise WorkpoolError(f"deployment {full_name} does not exist: run `sdl deploy` first") from None
    if campaign is not None:
        for stale in mark_stale_runs_crashed(campaign, deployment):
            logger.warning("flow run %s of %s marked Crashed (its process is gone)", stale, campaign)
    parameters: dict[str, object] = {"config_path": str(config_path.resolve()), "db_url": db_url}
    if budget is not None:
        parameters["budget"] = budget
    if time_scale is not None:
        parameters["time_scale"] = time_scale
    run = cast(FlowRun, run_deployment(full_name, parameters=parameters, timeout=0,  # sync: a FlowRun
                                       flow_run_name=campaign, tags=[campaign] if campaign else None))
    ui = get_current_settings().ui_url
    link = f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else None
    return QueuedCampaign(flow_run_id=run.id, flow_run_name=run.name, deployment=full_name, ui_url=link)


def worker_environment(db_url: str | None, state_dir: Path) -> dict[str, str]:
    """The worker's environment: the project's Prefect settings, the default repository, the state dir.

    The flow runs inherit it (a process worker passes its environment on); ``SDL_STATE_DIR`` is
    absolute because each flow run starts in a temporary working directory.
    """
    from sdl.prefect_server import prefect_quiet_environment

    env = prefect_quiet_environment()
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sdl,devices")
    env.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # the worker's own lines stay local
    env["SDL_STATE_DIR"] = str(state_dir.resolve())
    if db_url:
        env["SDL_DATABASE_URL"] = db_url
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_worker(pool: str, name: str, limit: int | None = None) -> None:
    """Run a Prefect process worker for ``pool`` in this process until SIGTERM or SIGINT.

    Why not ``prefect worker start``: its SIGTERM handler only sends SIGINT to itself, which a
    process started in the background of a shell ignores (measured: still running minutes after
    SIGTERM). Here SIGINT gets Python's default handler back and SIGTERM becomes a Ctrl-C, which
    cancels the worker's loops; flow runs in flight run in their own sessions and end Crashed when
    their worker is gone (``sdl submit`` resumes them).
    Call it after :func:`worker_environment` is in ``os.environ``: prefect reads settings at import.
    """
    import asyncio
    import signal

    from prefect.workers.process import ProcessWorker

    def as_ctrl_c(signum: int, frame: object) -> None:
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # asyncio.run turns it into a cancellation
    signal.signal(signal.SIGTERM, as_ctrl_c)
    worker = ProcessWorker(work_pool_name=pool, name=name, limit=limit)
    try:
        asyncio.run(worker.start(printer=lambda *args, **kwargs: logger.info(" ".join(map(str, args)))))
    except KeyboardInterrupt:
        logger.info("worker %s stopped", name)
