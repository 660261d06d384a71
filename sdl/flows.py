"""The campaign as a Prefect flow: a thin layer of tasks, logs and artifacts over :mod:`sdl.lab`.

Why this shape (KNOWN_FACTS): one flow run per campaign, named after the campaign and tagged with
it; each experiment is a task run inside it (a flow run per experiment would cost a second each),
submitted to a thread pool so that several robots and stations work at once. The instrument steps
are tasks with retries that fire only for *instrument* faults: a retry is safe because the job id
(the experiment's idempotency key) makes the instrument answer with the job it already has. A
material failure is not retried: it ends the experiment as ``failed``.

Monitoring: a progress artifact (experiments in an end state / budget), a table of the best
candidates, a markdown report per round (best so far, prospective model metrics, provenance of the
latest proposals, links to the PNG plots written next to the database), and logs through Prefect's
run logger (``sdl.*`` loggers are forwarded too).

Only this module and ``sdl/cli/run_commands.py`` import prefect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from sdl.exceptions import CampaignFailed, InstrumentError
from sdl.lab import Lab, Outcome, RoundReport, Ticket, drive, open_lab, run_experiment
from sdl.lab.simulation import world_best, world_rank

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

ProgressCallback = Callable[[dict[str, Any]], None]
_LISTENERS: list[ProgressCallback] = []


def artifact_key(campaign: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", campaign.lower()).strip("-") or "campaign"
    return f"{slug}-{what}"


def _instrument_fault(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: only instrument faults are retried (never a material failure or a bug)."""
    try:
        state.result()
    except InstrumentError:
        return True
    except BaseException:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False


@task(name="propose", cache_policy=NO_CACHE, persist_result=False)
def propose_task(lab: Lab, n: int) -> list[Ticket]:
    """Ask the engine for ``n`` experiments (pending = proposed + running) and commit them."""
    tickets = lab.propose(n)
    if tickets:
        get_run_logger().info(
            "proposed %s", ", ".join(f"{t.key} → {t.candidate_key}" for t in tickets)
        )
    return tickets


@task(
    name="synthesize",
    task_run_name="synthesize-{ticket.key}",
    retries=INSTRUMENT_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=_instrument_fault,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def synthesize_task(lab: Lab, ticket: Ticket) -> str:
    """The synthesis plan on a free robot; returns the robot's name."""
    lab.synthesize(ticket)
    return ticket.robot or ""


@task(
    name="characterize",
    task_run_name="characterize-{ticket.key}",
    retries=INSTRUMENT_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=_instrument_fault,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def characterize_task(lab: Lab, ticket: Ticket) -> float:
    """The characterization plan on a free station; returns the objective's ok value."""
    return lab.characterize(ticket)


@task(name="experiment", task_run_name="experiment-{ticket.key}", cache_policy=NO_CACHE, persist_result=False)
def experiment_task(lab: Lab, ticket: Ticket) -> Outcome:
    """One experiment to its end state (synthesis → characterization → record)."""
    outcome = run_experiment(lab, ticket, synthesize=lambda t: synthesize_task(lab, t),
                             characterize=lambda t: characterize_task(lab, t))
    log = get_run_logger()
    if outcome.state == "completed":
        log.info("%s (%s): %s = %.4g", ticket.key, ticket.candidate_key, lab.property, outcome.value)
    else:
        log.warning("%s (%s) %s: %s", ticket.key, ticket.candidate_key, outcome.state, outcome.reason)
    return outcome


class _Monitor:
    """Artifacts, logs and progress listeners of one flow run."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.name = lab.cfg.name
        self.log = get_run_logger()
        self.true_best = world_best(lab.cfg)
        self.progress_id: UUID = create_progress_artifact(  # type: ignore[assignment] # sync context: a UUID
            progress=self._percent(), key=artifact_key(self.name, "progress"),
            description=f"{self.name}: experiments in an end state / budget ({lab.budget})",
        )
        self._linked: set[str] = set()
        self._last_reported = -1

    def _percent(self) -> float:
        return round(100.0 * min(self.lab.n_ended, self.lab.budget) / max(self.lab.budget, 1), 1)

    def outcome(self, outcome: Outcome) -> None:
        update_progress_artifact(self.progress_id, progress=self._percent())
        counts = self.lab.counts()
        best = self.lab.best()
        info = {
            "campaign": self.name, "done": self.lab.n_ended, "budget": self.lab.budget, "counts": counts,
            "best_value": None if best is None else best.value,
            "best_candidate": None if best is None else best.candidate_key,
            "last": {"key": outcome.ticket.key, "state": outcome.state, "value": outcome.value},
        }
        for listener in _LISTENERS:
            try:
                listener(info)
            except Exception:
                logger.exception("progress listener failed")
        if self.lab.round_due():
            self.round(self.lab.round_report(self.true_best[1] if self.true_best else None))

    def round(self, report: RoundReport) -> None:
        self._last_reported = report.n_observed
        if report.top:
            create_table_artifact(report.top, key=artifact_key(self.name, "best-candidates"),
                                  description=f"{self.name}: best candidates after round {report.round}")
        create_markdown_artifact(self.markdown(report), key=artifact_key(self.name, "round"),
                                 description=f"{self.name}: round {report.round}")
        for what, path in report.plots.items():
            if what not in self._linked:  # a link artifact per plot; the file is rewritten each round
                create_link_artifact(path.resolve().as_uri(), link_text=f"{self.name} {what} plot",
                                     key=artifact_key(self.name, f"plot-{what.replace('_', '-')}"))
                self._linked.add(what)
        m = report.metrics
        self.log.info(
            "round %d: %d/%d done, best %s = %s (%s); model MAE %s, miscalibration %s",
            report.round, report.done, report.budget, self.lab.property, report.best_value,
            report.best_candidate, _fmt(m.get("mae")), _fmt(m.get("miscalibration_area")),
        )

    def markdown(self, report: RoundReport) -> str:
        lab, unit = self.lab, self.lab.cfg.objective.unit or ""
        counts = lab.counts()
        lines = [
            f"# {self.name} — round {report.round}",
            "",
            f"**Experiments:** {report.done} / {report.budget} "
            f"(completed {counts['completed']}, failed {counts['failed']}, abandoned {counts['abandoned']}, "
            f"in flight {counts['proposed'] + counts['running']})",
            "",
            f"**Best so far:** {lab.property} = {_fmt(report.best_value)} {unit} ({report.best_candidate}), "
            f"goal: {lab.objective.goal}",
        ]
        if self.true_best:
            lines += ["", f"**Best in the simulated world:** {_fmt(self.true_best[1])} {unit} ({self.true_best[0]})"]
        m = report.metrics
        lines += [
            "",
            "## Model",
            "",
            f"Model version `{lab.engine.model_version}`, trained on {lab.engine.n_observed} measurements. "
            "Metrics are prospective: each prediction was made when the experiment was proposed, "
            "before it was measured.",
            "",
            "| MAE | RMSE | Spearman(abs err, std) | miscalibration area | coverage 68 % | coverage 95 % | n |",
            "|---|---|---|---|---|---|---|",
            "| " + " | ".join(_fmt(m.get(k)) for k in ("mae", "rmse", "spearman_abs_error_std",
                                                      "miscalibration_area", "coverage_68", "coverage_95", "n"))
            + " |",
            "",
            "## Latest proposals (provenance)",
            "",
            "| experiment | candidate | state | model | acquisition | predicted | std | batch | measured |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in report.provenance:
            lines.append("| " + " | ".join(_fmt(p.get(k)) for k in (
                "experiment", "candidate", "state", "model", "acquisition", "predicted", "std", "batch",
                "measured")) + " |")
        if report.plots:
            lines += ["", "## Plots", ""]
            lines += [f"- [{what.replace('_', ' ')}]({path.resolve().as_uri()}) `{path}`"
                      for what, path in report.plots.items()]
        return "\n".join(lines) + "\n"

    def final(self, state: str) -> dict[str, Any]:
        report = self.lab.round_report(self.true_best[1] if self.true_best else None)
        if report.n_observed > self._last_reported:
            self.round(report)
        update_progress_artifact(self.progress_id, progress=self._percent())
        summary = {
            "campaign": self.name, "campaign_id": self.lab.campaign_id, "state": state,
            "stop_reason": self.lab.stop_reason, "budget": self.lab.budget, "counts": self.lab.counts(),
            "best_value": report.best_value, "best_candidate": report.best_candidate,
            "true_best_value": self.true_best[1] if self.true_best else None,
            "true_best_candidate": self.true_best[0] if self.true_best else None,
            "best_world_rank": world_rank(self.lab.cfg, report.best_value),
            "interrupted": self.lab.interrupted,
            "plots": {k: str(v) for k, v in report.plots.items()},
        }
        md = [f"# {self.name}: {state}", "", f"Stopped because: {self.lab.stop_reason}", "",
              f"Best found: {self.lab.property} = {_fmt(report.best_value)} ({report.best_candidate})"]
        if self.true_best:
            md.append(f"\nBest in the simulated world: {_fmt(self.true_best[1])} ({self.true_best[0]})")
        create_markdown_artifact("\n".join(md) + "\n", key=artifact_key(self.name, "summary"),
                                 description=f"{self.name}: final summary")
        self.log.info("campaign %s %s (%s): best %s = %s (%s)", self.name, state, self.lab.stop_reason,
                      self.lab.property, report.best_value, report.best_candidate)
        return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
    with open_lab(cfg, url, budget=budget, seed=seed, time_scale=time_scale, amend=amend) as lab:
        from sdl import prefect_control

        prefect_control.attach(lab)  # the UI's Cancel button, the approval form (issue 11)
        monitor = _Monitor(lab)

        def submit(ticket: Ticket) -> _Pending:
            return _Pending(experiment_task.submit(lab, ticket))

        def on_done(ticket: Ticket, pending: _Pending) -> None:
            outcome = pending.future.result(raise_on_failure=True)
            monitor.outcome(outcome)

        drive(lab, submit, on_done, propose=lambda n: propose_task(lab, n))
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
