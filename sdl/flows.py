"""The campaign as a Prefect flow: a thin layer of tasks, logs and artifacts over :mod:`sdl.lab`.

Why this shape (KNOWN_FACTS): one flow run per campaign, named after the campaign and tagged with
it; each experiment is a task run inside it (a flow run per experiment would cost a second each),
submitted to a thread pool so that several robots and stations work at once. The instrument steps
run inside that one task run (a task run per step cost 12 ms of CPU per experiment) and retry
there, for *instrument* faults only (``INSTRUMENT_RETRIES`` after ``RETRY_DELAYS``, each retry a
warning in the experiment's task-run log): a retry is safe because the job id (the experiment's
idempotency key) makes the instrument answer with the job it already has. A material failure is
not retried: it ends the experiment as ``failed``.

Monitoring: the campaign's page (:mod:`sdl.report.page`): a fixed set of artifacts, each created
once per flow run and updated in place every round (the report, one card per plot with the image
embedded, the round's proposals, the best candidates, progress, the summary), and one flow-run log
line per experiment (proposed, started, measured / failed with id, formula and value). Prefect's
own "Finished in state Completed()" line per task run is silenced for the campaign's tasks
(``prefect.task_runs`` at WARNING while the flow runs; failures still show).

Only this module and ``sdl/cli/run_commands.py`` import prefect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from sdl.exceptions import CampaignFailed
from sdl.lab import Lab, Outcome, RoundReport, Ticket, drive, open_lab, run_experiment, with_retries
from sdl.lab.alerts import register_prefect_bridge
from sdl.lab.simulation import world_best, world_rank, world_values
from sdl.report import CampaignPage, Card, random_best_of_n
from sdl.report.page import format_cell

__all__ = [
    "INSTRUMENT_RETRIES",
    "campaign_flow",
    "run_campaign",
    "serve_campaigns",
    "artifact_key",
]

logger = logging.getLogger(__name__)

INSTRUMENT_RETRIES = 3
"""Retries of one instrument step after an instrument fault (the transport already retried lines)."""
RETRY_DELAYS = [0.2, 1.0, 2.0]
PROGRESS_EVERY_S = 1.0
"""Shortest time between two updates of the progress artifact while experiments end."""

ProgressCallback = Callable[[dict[str, Any]], None]
_LISTENERS: list[ProgressCallback] = []


def artifact_key(campaign: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", campaign.lower()).strip("-") or "campaign"
    return f"{slug}-{what}"


class _PrefectAlerts:
    """What alerts need of Prefect (``sdl.lab.alerts``): notification blocks by slug, the run's link."""

    def send_to_block(self, slug: str, title: str, body: str) -> None:
        from prefect.blocks.abstract import NotificationBlock
        from prefect.blocks.core import Block

        block = Block.load(slug)
        if not isinstance(block, NotificationBlock):
            raise TypeError(f"block {slug!r} is a {type(block).__name__}, not a notification block")
        with block.raise_on_failure():
            block.notify(body, subject=title)  # type: ignore[unused-coroutine] # sync here: returns None

    def run_link(self) -> str | None:
        from prefect.runtime import flow_run
        from prefect.settings import get_current_settings

        run_id = flow_run.id
        if run_id is None:
            return None
        ui = get_current_settings().ui_url
        return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui else f"flow run {run_id} (ephemeral Prefect)"


register_prefect_bridge(_PrefectAlerts())


@task(name="propose", cache_policy=NO_CACHE, persist_result=False)
def propose_task(lab: Lab, n: int, monitor: _Monitor) -> list[Ticket]:
    """Ask the engine for ``n`` experiments (pending = proposed + running) and commit them."""
    tickets = lab.propose(n)
    for ticket in tickets:
        monitor.log.info(monitor.page.proposed_line(ticket))
    return tickets


@task(name="experiment", task_run_name="experiment-{ticket.key}", cache_policy=NO_CACHE, persist_result=False)
def experiment_task(lab: Lab, ticket: Ticket, monitor: _Monitor) -> Outcome:
    """One experiment to its end state (synthesis → characterization → record), one log line per step.

    One task run per experiment: the instrument steps retry inside it (``with_retries``, the
    policy Prefect's task retries had: ``INSTRUMENT_RETRIES`` after ``RETRY_DELAYS``, instrument
    faults only), each retry a warning in this task run's log.
    """
    log = get_run_logger()
    synthesize = with_retries(lab.synthesize, INSTRUMENT_RETRIES + 1, delays=RETRY_DELAYS, log=log)
    characterize = with_retries(lab.characterize, INSTRUMENT_RETRIES + 1, delays=RETRY_DELAYS, log=log)

    def started(t: Ticket) -> object:
        monitor.log.info(monitor.page.started_line(t))
        return synthesize(t)

    outcome = run_experiment(lab, ticket, synthesize=started, characterize=characterize)
    line = monitor.page.outcome_line(outcome)
    if outcome.state == "completed":
        monitor.log.info(line)
    else:
        monitor.log.warning(line)
    return outcome


@contextlib.contextmanager
def quiet_task_states() -> Iterator[None]:
    """Silence Prefect's "Finished in state Completed()" line per task run while a campaign runs.

    Prefect 3.8.8 logs it at INFO on ``prefect.task_runs`` (failures at ERROR, kept); the campaign
    logs one line per experiment through the flow run logger instead.
    """
    task_logger = logging.getLogger("prefect.task_runs")
    previous = task_logger.level
    task_logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        task_logger.setLevel(previous)


class _Board:
    """The page's artifacts: created once per flow run, then updated in place (one card per key)."""

    def __init__(self, campaign: str) -> None:
        self.campaign = campaign
        self.ids: dict[str, UUID] = {}

    def put(self, card: Card) -> None:
        key = artifact_key(self.campaign, card.what)
        try:
            if key not in self.ids:
                made = (create_table_artifact(card.table, key=key, description=card.description) if card.table
                        else create_markdown_artifact(card.markdown, key=key, description=card.description))
                self.ids[key] = cast(UUID, made)  # sync context: a UUID
                return
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import ArtifactUpdate

            data = _table_json(card.table) if card.table else card.markdown
            with get_client(sync_client=True) as client:
                client.update_artifact(self.ids[key], ArtifactUpdate(data=data, description=card.description))
        except Exception:
            logger.exception("could not write artifact %s", key)


def _table_json(rows: list[dict[str, Any]]) -> str:
    """A table artifact's data as Prefect stores it (JSON, NaN as null)."""
    clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    return json.dumps(clean)


class _Monitor:
    """The flow run's page (artifacts), its per-experiment log lines and the progress listeners."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.name = lab.cfg.name
        self.log = get_run_logger()
        self.true_best = world_best(lab.cfg)
        world = world_values(lab.cfg)
        baseline = None if world is None else random_best_of_n(world[1], lab.objective.goal, lab.budget)
        self.page = CampaignPage(lab, self.true_best, baseline)
        self.board = _Board(self.name)
        self.progress_id: UUID = create_progress_artifact(  # type: ignore[assignment] # sync context: a UUID
            progress=self._percent(), key=artifact_key(self.name, "progress"),
            description=self.page.progress_description(),
        )
        self._progress_at = time.monotonic()
        self._last_reported = -1

    def _percent(self) -> float:
        return round(100.0 * min(self.lab.n_ended, self.lab.budget) / max(self.lab.budget, 1), 1)

    def outcome(self, outcome: Outcome) -> None:
        # The progress bar is one API round trip: at most every PROGRESS_EVERY_S (the UI polls
        # no faster), and always at the end of the budget and in final().
        now = time.monotonic()
        if now - self._progress_at >= PROGRESS_EVERY_S or self.lab.n_ended >= self.lab.budget:
            self._progress_at = now
            update_progress_artifact(self.progress_id, progress=self._percent())
        if _LISTENERS:
            self._tell_listeners(outcome)
        if self.lab.round_due():
            self.round(self.lab.round_report(self.true_best[1] if self.true_best else None))

    def _tell_listeners(self, outcome: Outcome) -> None:
        """Done / budget / best for the progress listeners (the ledger's best: no query per experiment)."""
        counts = self.lab.counts()
        best = self.lab.ledger.best()
        info = {
            "campaign": self.name, "done": self.lab.n_ended, "budget": self.lab.budget, "counts": counts,
            "best_value": None if best is None else best[2],
            "best_candidate": None if best is None else best[1],
            "last": {"key": outcome.ticket.key, "state": outcome.state, "value": outcome.value},
        }
        for listener in _LISTENERS:
            try:
                listener(info)
            except Exception:
                logger.exception("progress listener failed")

    def round(self, report: RoundReport) -> None:
        self._last_reported = report.n_observed
        for card in self.page.round_cards(report):
            self.board.put(card)
        m = report.metrics
        self.log.info(
            "round %d: %d/%d done, best %s = %s, %s; model MAE %s, miscalibration %s",
            report.round, report.done, report.budget, self.lab.property, self.page.value(report.best_value),
            self.page.named(report.best_candidate), format_cell(m.get("mae")),
            format_cell(m.get("miscalibration_area")),
        )

    def final(self, state: str) -> dict[str, Any]:
        report = self.lab.round_report(self.true_best[1] if self.true_best else None)
        if report.n_observed > self._last_reported:
            self.round(report)
        update_progress_artifact(self.progress_id, progress=self._percent())
        rank = world_rank(self.lab.cfg, report.best_value)
        summary = {
            "campaign": self.name, "campaign_id": self.lab.campaign_id, "state": state,
            "stop_reason": self.lab.stop_reason, "budget": self.lab.budget, "counts": self.lab.counts(),
            "best_value": report.best_value, "best_candidate": report.best_candidate,
            "true_best_value": self.true_best[1] if self.true_best else None,
            "true_best_candidate": self.true_best[0] if self.true_best else None,
            "best_world_rank": rank,
            "interrupted": self.lab.interrupted,
            "plots": {k: str(v) for k, v in report.plots.items()},
        }
        if self.lab.cfg.objectives is not None:
            from sdl.report.pareto import pareto_summary

            summary.update(pareto_summary(self.lab))
        self.board.put(self.page.summary_card(state, report, rank))
        self.log.info("campaign %s %s (%s): best %s = %s, %s", self.name, state, self.lab.stop_reason,
                      self.lab.property, self.page.value(report.best_value), self.page.named(report.best_candidate))
        return summary


def _flow_run_name() -> str:
    """Name a flow run after its campaign (also for runs launched from the UI)."""
    from prefect.runtime import flow_run

    path = (flow_run.parameters or {}).get("config_path")
    try:
        from sdl.config import load_campaign

        return load_campaign(str(path)).name
    except Exception:  # noqa: BLE001 - the run itself will report a bad file
        return f"campaign {Path(str(path)).stem}"


def _tag_flow_run(name: str) -> None:
    """Tag the running flow run with the campaign's name (runs started from a deployment too)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    current = list(flow_run.tags or [])
    if name in current or flow_run.id is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=[*current, name])
    except Exception:
        logger.warning("could not tag flow run with %s", name, exc_info=True)


def _lease_holder() -> str:
    """Who holds the campaign's lease, as a refused second runner is told: a worker's flow run or ``sdl run``."""
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return "sdl run"
    return f"flow run {flow_run.name} ({flow_run.id}) of a worker"[:200]


@flow(
    name="sdl-campaign",
    flow_run_name=_flow_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=16),  # type: ignore[arg-type] # prefect infers Never here
    persist_result=False,
    log_prints=False,
)
def campaign_flow(
    config_path: str,
    db_url: str | None = None,
    budget: int | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
    amend: bool = False,
) -> Any:
    """Run (or resume) the campaign described by a YAML file to its end.

    The flow run ends Completed (budget or a stopping rule), Failed (an instrument gone, the
    failure budget spent: the message is the one line that says why) or Cancelled (SIGINT /
    SIGTERM); the summary is the state's data either way.

    Args:
        config_path: The campaign YAML.
        db_url: Repository URL (default: ``SDL_DATABASE_URL``, then the YAML, then ``sqlite:///sdl.db``).
        budget: Overrides ``budget.experiments``.
        seed: Overrides ``seed``.
        time_scale: Overrides the simulators' time scale.
        amend: Accept a YAML that differs from the stored campaign (recorded as an event).

    Returns:
        A summary (state, stop reason, counts per state, best value and candidate, the world's
        best), or a Failed / Cancelled state carrying it.
    """
    from prefect.states import Cancelled, Failed

    from sdl.config import load_campaign
    from sdl.settings import resolve_database_url

    cfg = load_campaign(config_path)
    url = resolve_database_url(db_url, cfg)
    _tag_flow_run(cfg.name)
    log = get_run_logger()
    log.info("campaign %s: repository %s", cfg.name, re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url))
    with open_lab(cfg, url, budget=budget, seed=seed, time_scale=time_scale, amend=amend,
                  holder=_lease_holder()) as lab, \
            quiet_task_states():
        from sdl import prefect_control

        prefect_control.attach(lab)  # the UI's Cancel button, the approval form (issue 11)
        monitor = _Monitor(lab)

        def submit(ticket: Ticket) -> _Pending:
            return _Pending(experiment_task.submit(lab, ticket, monitor))

        def on_done(ticket: Ticket, pending: _Pending) -> None:
            outcome = pending.future.result(raise_on_failure=True)
            monitor.outcome(outcome)

        def propose(n: int) -> list[Ticket]:
            # A task run when a model chooses (a fit can take seconds: the UI shows it as a step);
            # random picks cost less than a task run of their own, so they are a plain call.
            if lab.engine.selection.needs_model:
                return propose_task(lab, n, monitor)
            return propose_task.fn(lab, n, monitor)

        drive(lab, submit, on_done, propose=propose)
        state = lab.finish()
        summary = monitor.final(state)
        if state == "failed":
            log.error("campaign %s failed: %s", cfg.name, lab.stop_reason)
            return Failed(message=str(lab.stop_reason), data=summary)
        if lab.interrupted is not None:
            return Cancelled(message=str(lab.stop_reason), data=summary)
        return summary


class _Pending:
    """A submitted experiment; ``done()`` without a round trip to the API."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def done(self) -> bool:
        return bool(self.future.wrapped_future.done())


def run_campaign(
    config_path: str | Path,
    *,
    db_url: str | None = None,
    budget: int | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
    on_progress: ProgressCallback | None = None,
    amend: bool = False,
) -> dict[str, Any]:
    """Run the campaign flow in this process (ephemeral Prefect, or the server at PREFECT_API_URL).

    The flow run is named after the campaign and tagged with it; the flow heartbeat is off (it
    costs a second per flow run, KNOWN_FACTS).

    Args:
        on_progress: Called after every experiment with done / budget / best (the CLI's progress bar).
        amend: Accept a YAML that differs from the stored campaign.

    Returns:
        The summary; its ``state`` is ``completed``, ``stopped`` (a rule or an interrupt) or
        ``failed``.

    Raises:
        CampaignFailed: The flow run failed (its message is the reason, in one line).
        SDLError: The campaign could not start (bad data, a locked or changed campaign, ...).
    """
    from sdl.config import load_campaign

    cfg = load_campaign(config_path)
    if on_progress is not None:
        _LISTENERS.append(on_progress)
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), tags(cfg.name):
            state = cast(State[Any], campaign_flow.with_options(flow_run_name=cfg.name)(
                config_path=str(Path(config_path).resolve()), db_url=db_url, budget=budget, seed=seed,
                time_scale=time_scale, amend=amend, return_state=True,
            ))
    finally:
        if on_progress is not None:
            _LISTENERS.remove(on_progress)
    if state.is_completed() or state.is_cancelled():
        result = state.result(raise_on_failure=False)
        if isinstance(result, dict):
            return result
    if state.is_failed():
        result = state.result(raise_on_failure=False)
        if isinstance(result, dict):
            raise CampaignFailed(state.message or str(result.get("stop_reason")))
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        raise error
    raise CampaignFailed(f"campaign {cfg.name}: flow run ended {state.name}: {state.message}")


def serve_campaigns(name: str = "sdl-campaign") -> None:
    """Serve the campaign flow as a deployment, so campaigns can be launched from the UI.

    Blocks; needs ``PREFECT_API_URL`` (``sdl ui``). The run form asks for the YAML path.
    """
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        campaign_flow.serve(name=name, tags=["sdl"], description="Run or resume a campaign from its YAML path.")
