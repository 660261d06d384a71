"""The laboratory as plain Python: instruments, the life of one experiment, resume after a crash.

Why a Prefect-free module: every decision of the closed loop (which instrument is free, which state
an experiment is in, what to do with an experiment caught mid-run by a crash, when to stop) must be
testable without a Prefect server, and ``sdl/flows.py`` must stay a thin layer of tasks and
artifacts over these functions.

Exactly once. The repository is the source of truth and every state change is one committed
transaction (``Store``) with an idempotency key ``"<campaign>:<seq>"``. The same key, made safe for
the wire, is the *job id* the robot and the station are given, and the simulators keep a journal of
their jobs across restarts. An experiment's life:

1. ``proposed``: committed with its key before any instrument is touched.
2. ``running``: committed *before* the robot gets ``SYNTH START <job>``.
3. the robot synthesizes (a Bluesky plan); the station measures (a Bluesky plan whose events the
   ``RepositoryWriter`` turns into measurements, each committed as it arrives).
4. ``completed`` (an ``ok`` measurement of the objective exists), ``failed`` (material failure:
   recorded, never retried) or ``abandoned`` (the sample is lost to an instrument fault or a crash).

On start (:meth:`Lab.recover`), ``proposed`` experiments are simply run; each ``running`` one is
reconciled with the robots by its job id: *done* → go on to characterization (or straight to
completion when its measurement is already in the repository); *unknown* → never started, safe to
start; *running* → wait for it; anything else (interrupted, aborted) → ``abandoned``. Nothing is
synthesized twice, nothing measured is lost.

Budget. An experiment *counts* once it reached an end state: completed + failed + abandoned.
The campaign stops proposing when that count plus the experiments in flight equals the budget,
so it ends with exactly ``budget`` experiments in end states (unless a stopping rule ends it early).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdl.exceptions import InstrumentError, MaterialFailure, SDLError
from sdl.runner import run_plan

__all__ = [
    "ROBOT",
    "STATION",
    "Ticket",
    "Outcome",
    "RoundReport",
    "InstrumentPool",
    "Lab",
    "job_id_for",
    "campaign_token",
    "state_dir_for",
    "open_lab",
    "END_STATES",
    "with_retries",
    "run_experiment",
    "drive",
    "run_plain",
]

logger = logging.getLogger(__name__)

ROBOT = "synthesis"
STATION = "characterization"
END_STATES = ("completed", "failed", "abandoned")


def job_id_for(idempotency_key: str, token: str = "") -> str:
    """The wire-safe job id of an experiment (protocol: 1-128 of ``[A-Za-z0-9_.:-]``)."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]+", "_", idempotency_key)
    if token:
        safe = f"{token}.{safe}"
    return safe[-128:]


def campaign_token(campaign: Any) -> str:
    """Prefix of a campaign's job ids: id and creation time, so that two databases sharing a
    journal directory (a campaign re-created under the same name) never share a job id."""
    return f"c{campaign.id}-{int(campaign.created_at.timestamp())}"


def state_dir_for(database_url: str) -> Path:
    """Directory next to the database for journals, plots and the Prefect home (``sdl-runs/``).

    Beside a SQLite file; for a server database (PostgreSQL) in the working directory. The
    ``SDL_STATE_DIR`` environment variable overrides both.
    """
    from sqlalchemy.engine import make_url

    if os.environ.get("SDL_STATE_DIR"):
        return Path(os.environ["SDL_STATE_DIR"]).expanduser().resolve()

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().resolve().parent / "sdl-runs"
    return Path.cwd() / "sdl-runs"


@dataclass
class Ticket:
    """What a worker needs to carry one experiment through the instruments.

    Attributes:
        experiment_id: Repository id.
        key: Idempotency key (``"<campaign>:<seq>"``).
        job_id: The key as sent to the instruments.
        candidate_key: The engine's key (candidate id or canonical parameters).
        params: Process parameters (empty in pool mode).
        recipe: What the robot is told to make.
        stage: Where to (re)start: ``"synthesis"``, ``"characterization"`` or ``"record"``.
        robot: Instrument that synthesized it, once known.
    """

    experiment_id: int
    key: str
    job_id: str
    candidate_key: str
    params: dict[str, Any]
    recipe: dict[str, Any]
    stage: str = "synthesis"
    robot: str | None = None
    predicted_mean: float | None = None
    predicted_std: float | None = None
    acquisition_value: float | None = None
    batch_id: str | None = None
    model_version: str | None = None
    attempts: int = 0


@dataclass
class Outcome:
    """How an experiment ended."""

    ticket: Ticket
    state: str
    value: float | None = None
    reason: str | None = None


@dataclass
class RoundReport:
    """What a retraining round reports to the monitoring layer (artifacts, logs)."""

    round: int
    n_observed: int
    done: int
    budget: int
    best_value: float | None
    best_candidate: str | None
    true_best: float | None
    metrics: dict[str, Any]
    top: list[dict[str, Any]]
    provenance: list[dict[str, Any]]
    plots: dict[str, Path]


class InstrumentPool:
    """Free instruments by role; each instrument serves one experiment at a time.

    Why a pool and not a lock per instrument: with several robots, an experiment takes *any* free
    robot, except an experiment whose job a given robot already knows (a retry or a resumed
    experiment), which must go back to that robot.

    Args:
        instruments: ``{name: (role, device)}``.
        on_release: Called (no arguments) whenever an instrument is given back.
    """

    def __init__(
        self, instruments: dict[str, tuple[str, Any]], on_release: Callable[[], None] | None = None
    ) -> None:
        self.devices: dict[str, Any] = {name: dev for name, (_, dev) in instruments.items()}
        self.roles: dict[str, str] = {name: role for name, (role, _) in instruments.items()}
        self._free: set[str] = set(self.roles)
        self._cond = threading.Condition()
        self._on_release = on_release

    def names(self, role: str) -> list[str]:
        """Names of the instruments with ``role``, in configuration order."""
        return [n for n, r in self.roles.items() if r == role]

    def count(self, role: str) -> int:
        """Number of instruments with ``role``."""
        return len(self.names(role))

    def free(self, role: str) -> int:
        """Number of instruments of ``role`` free right now."""
        with self._cond:
            return sum(1 for n in self._free if self.roles[n] == role)

    @contextlib.contextmanager
    def lease(self, role: str, name: str | None = None) -> Iterator[tuple[str, Any]]:
        """Borrow a free instrument of ``role`` (or exactly ``name``); blocks until one frees.

        Yields:
            ``(name, device)``.
        """
        candidates = [name] if name is not None else self.names(role)
        if not candidates or any(c not in self.roles for c in candidates):
            raise SDLError(f"no instrument {name or ''} with role {role!r} in this campaign".replace("  ", " "))
        with self._cond:
            while True:
                free = [c for c in candidates if c in self._free]
                if free:
                    taken = free[0]
                    self._free.discard(taken)
                    break
                self._cond.wait(1.0)
        try:
            yield taken, self.devices[taken]
        finally:
            with self._cond:
                self._free.add(taken)
                self._cond.notify_all()
            if self._on_release is not None:
                self._on_release()


class Lab:
    """One campaign's laboratory: repository, engine, instruments and the rules that tie them.

    Build it with :func:`open_lab` (which also starts simulators and connects devices). Public
    methods are safe to call from worker threads; engine calls are serialized by a lock.

    Args:
        cfg: The loaded campaign.
        store: The repository (``sdl.repository.Store``), already at head.
        engine: ``sdl.engine.Engine`` for this campaign.
        pool: Connected instruments.
        budget: Experiments to reach an end state (default ``cfg.budget.experiments``).
        seed: Campaign seed recorded in the repository (default ``cfg.seed``).
        state_dir: Where plots go.
        max_measure_attempts: Measurements of one sample before giving up on a flagged (drifted) value.
    """

    def __init__(
        self,
        cfg: Any,
        store: Any,
        engine: Any,
        pool: InstrumentPool,
        *,
        budget: int | None = None,
        seed: int | None = None,
        state_dir: Path | None = None,
        max_measure_attempts: int = 3,
    ) -> None:
        from sdl.documents import RepositoryWriter
        from sdl.objectives import Objective

        self.cfg = cfg
        self.store = store
        self.engine = engine
        self.pool = pool
        self.budget = int(budget if budget is not None else cfg.budget.experiments)
        self.seed = int(seed if seed is not None else cfg.seed)
        self.state_dir = Path(state_dir) if state_dir else Path.cwd() / "sdl-runs" / cfg.name
        self.objective = Objective.from_any(cfg.objective)
        self.property = cfg.objective.property
        self.max_measure_attempts = max_measure_attempts
        self.writer = RepositoryWriter(store)
        self.pool._on_release = self.notify
        self._lock = threading.RLock()
        self._engine_lock = threading.Lock()
        self._changed = threading.Condition()
        self._inflight: dict[int, Ticket] = {}
        self._excluded: set[str] = set()  # failed / abandoned candidates: never proposed again
        self._current: dict[str, int | None] = {}  # instrument → experiment it works for
        self._values: list[tuple[int, float]] = []  # (experiment id, value) in completion order
        self._best_utility: float | None = None
        self._since_improvement = 0
        self._reported = 0
        self._round = 0
        self._last_model_version: str | None = None
        self._model_version_id: int | None = None  # repository row of the model behind new proposals
        self._counts = {state: 0 for state in ("proposed", "running", *END_STATES)}
        self._measure_jobs: dict[str, str] = {}  # measurement job id → station that has it
        self._recovered: set[str] = set()  # keys of experiments a previous process left unfinished
        self.stop_reason: str | None = None
        self.campaign_id = 0
        self._token = ""

    # ------------------------------------------------------------------ campaign and engine
    def start(self) -> None:
        """Get or create the campaign row and teach the engine everything already measured."""
        import sdl

        record = self.store.get_or_create_campaign(
            self.cfg.name,
            snapshot=self.cfg.snapshot(),
            config_hash=self.cfg.config_hash(),
            seed=self.seed,
            budget=self.budget,
            description=self.cfg.description,
            code_version=sdl.__version__,
        )
        self.campaign_id = record.id
        self._token = campaign_token(record)
        if record.state != "running":
            self.store.set_campaign_state(record.id, "running", reason="sdl run (resume)")
        from sdl.engine import Observation

        observations = self.store.observations(self.campaign_id, self.property)
        if observations:
            self.engine.observe(
                [Observation(key=o.candidate_key, params=o.params, value=o.value) for o in observations]
            )
        for o in observations:
            self._record_value(o.experiment_id, o.value)
        for exp in self.store.experiments(self.campaign_id):
            self._counts[exp.state] += 1
            if exp.state in ("failed", "abandoned"):
                self._excluded.add(exp.candidate_key)
        self._reported = len(self._values)
        logger.info(
            "campaign %r (id %d): %d completed, %d failed, %d abandoned, %d pending; budget %d",
            self.cfg.name, self.campaign_id, self._counts["completed"], self._counts["failed"],
            self._counts["abandoned"], self._counts["proposed"] + self._counts["running"], self.budget,
        )

    def event(self, kind: str, message: str, *, experiment_id: int | None = None,
              level: str = "info", payload: dict[str, Any] | None = None) -> None:
        """Append to the repository's event log (never raises: monitoring must not stop the lab)."""
        try:
            self.store.log_event(kind, message, campaign_id=self.campaign_id or None,
                                 experiment_id=experiment_id, level=level, payload=payload)
        except Exception:  # noqa: BLE001
            logger.exception("could not log event %s", kind)

    def fault_callback(self, instrument: str) -> Callable[[str, str], None]:
        """``on_fault`` for an instrument's transport: every line fault goes to the event log."""

        def on_fault(kind: str, message: str) -> None:
            if "JOB?" in message and "NOT_FOUND" in message:
                return  # asking about a job the instrument never saw is a question, not a fault
            experiment_id = self._current.get(instrument)
            logger.warning("%s: %s fault: %s", instrument, kind, message)
            self.event(
                "instrument.fault", f"{instrument}: {kind}: {message}", experiment_id=experiment_id,
                level="warning", payload={"instrument": instrument, "fault": kind, "message": message},
            )

        return on_fault

    # ------------------------------------------------------------------ counting and stopping
    @property
    def n_ended(self) -> int:
        """Experiments in an end state (what the budget counts)."""
        return sum(self._counts[s] for s in END_STATES)

    def counts(self) -> dict[str, int]:
        """Experiments per state, as this process knows them (the repository agrees)."""
        with self._lock:
            return dict(self._counts)

    def finished(self) -> bool:
        """True when nothing is in flight and no more experiments will be proposed."""
        with self._lock:
            return not self._inflight and self.wanted() == 0

    def wanted(self) -> int:
        """How many experiments to propose now: one per free robot, within budget and rules."""
        with self._lock:
            if self.stop_reason is None and self.n_ended >= self.budget:
                self.stop_reason = f"budget of {self.budget} experiments reached"
            if self.stop_reason is not None:
                return 0
            remaining = self.budget - self.n_ended - len(self._inflight)
            robots = self.pool.count(ROBOT)
            stations = self.pool.count(STATION)
            waiting_for_robot = sum(1 for t in self._inflight.values() if t.stage == "synthesis")
            room = robots + stations - len(self._inflight)
            return max(0, min(remaining, robots - waiting_for_robot, room))

    def _record_value(self, experiment_id: int, value: float) -> None:
        self._values.append((experiment_id, value))
        utility = float(self.objective.utility(value))
        if self._best_utility is None or utility > self._best_utility + 1e-12:
            self._best_utility = utility
            self._since_improvement = 0
        else:
            self._since_improvement += 1

    def best(self) -> Any:
        """The best completed experiment (``BestRecord``) or None."""
        return self.store.best_so_far(
            self.campaign_id, self.property, self.objective.goal, self.objective.target_range
        )

    def _check_rules(self) -> None:
        """Set :attr:`stop_reason` when a stopping rule fires (called after every end state)."""
        rules = self.cfg.stopping
        if self.stop_reason is not None:
            return
        if self.n_ended >= self.budget:
            self.stop_reason = f"budget of {self.budget} experiments reached"
        elif rules.goal_value is not None and self._values and self._reached(rules.goal_value):
            self.stop_reason = f"goal value {rules.goal_value} reached"
        elif rules.patience is not None and self._values:
            per_round = max(1, int(self.cfg.acquisition.batch_size))
            if self._since_improvement >= rules.patience * per_round:
                self.stop_reason = (
                    f"no improvement in {rules.patience} rounds ({self._since_improvement} experiments)"
                )
        max_failures = self.cfg.budget.max_failures
        if self.stop_reason is None and max_failures is not None and self._counts["failed"] > max_failures:
            self.stop_reason = f"{self._counts['failed']} failed experiments (max_failures {max_failures})"
        if self.stop_reason is not None:
            logger.info("stopping: %s", self.stop_reason)

    def _reached(self, goal_value: float) -> bool:
        best = self.objective.best_value([v for _, v in self._values])
        if best is None:
            return False
        if self.objective.goal == "maximize":
            return best >= goal_value
        if self.objective.goal == "minimize":
            return best <= goal_value
        return abs(best - goal_value) <= 1e-12 or float(self.objective.utility(best)) >= 0.0

    def _expected_improvement(self, proposals: Sequence[Any]) -> float | None:
        """Largest closed-form expected improvement (in utility) of a model-based batch, else None."""
        from scipy.stats import norm

        if self._best_utility is None or self.objective.goal == "target":
            return None
        sign = 1.0 if self.objective.goal == "maximize" else -1.0
        best = None
        for p in proposals:
            if p.predicted_mean is None or p.predicted_std is None:
                return None
            mu, sd = sign * p.predicted_mean, max(float(p.predicted_std), 1e-12)
            z = (mu - self._best_utility) / sd
            ei = sd * float(norm.pdf(z)) + (mu - self._best_utility) * float(norm.cdf(z))
            best = ei if best is None else max(best, ei)
        return best

    # ------------------------------------------------------------------ proposals
    def recipe_for(self, candidate_key: str, params: dict[str, Any], job_id: str) -> dict[str, Any]:
        """What the robot is told: a crystal candidate id, or process parameters."""
        candidates = self.cfg.search_space.candidates
        if candidates is not None and candidates.structure_column:
            return {"job_id": job_id, "candidate": candidate_key}
        return {"job_id": job_id, "params": dict(params)}

    def _ticket(self, exp: Any, stage: str = "synthesis") -> Ticket:
        job_id = job_id_for(exp.idempotency_key, self._token)
        return Ticket(
            experiment_id=exp.id, key=exp.idempotency_key, job_id=job_id, candidate_key=exp.candidate_key,
            params=dict(exp.params or {}), recipe=self.recipe_for(exp.candidate_key, dict(exp.params or {}), job_id),
            stage=stage, robot=(exp.instruments or [None])[0], predicted_mean=exp.predicted_mean,
            predicted_std=exp.predicted_std, acquisition_value=exp.acquisition_value, batch_id=exp.batch_id,
            model_version=exp.model_version,
        )

    def propose(self, n: int) -> list[Ticket]:
        """Ask the engine for ``n`` experiments and commit each as ``proposed`` with its key.

        Pending for the engine: proposed and running experiments, plus failed and abandoned
        candidates (a lost sample is not proposed again).
        """
        from sdl.exceptions import EngineError

        if n <= 0:
            return []
        with self._engine_lock:
            pending = [t.candidate_key for t in self._inflight.values()] + sorted(self._excluded)
            try:
                proposals = self.engine.propose(q=n, pending=pending)
            except EngineError as exc:
                with self._lock:
                    self.stop_reason = f"engine cannot propose: {exc}"
                self.event("campaign.stopping", self.stop_reason, level="warning")
                return []
            version = self.engine.model_version
            if version != self._last_model_version:
                # Under the engine lock: metrics and the training count describe one fitted model.
                self._model_changed(version)
        threshold = self.cfg.stopping.min_expected_improvement
        ei = self._expected_improvement(proposals)
        if threshold is not None and ei is not None and ei < threshold and self._counts["completed"] > 0:
            with self._lock:
                self.stop_reason = f"expected improvement {ei:.3g} below {threshold}"
            self.event("campaign.stopping", self.stop_reason)
            return []
        tickets = []
        with self._lock:
            for p in proposals:
                seq = sum(self._counts.values()) + 1
                key = f"{self.cfg.name}:{seq}"
                exp_id = self.store.propose_experiment(
                    self.campaign_id, idempotency_key=key, candidate_key=p.key, params=p.params,
                    provenance={
                        "model_version": p.model_version, "model_version_id": self._model_version_id,
                        "acquisition_value": p.acquisition_value,
                        "predicted_mean": p.predicted_mean, "predicted_std": p.predicted_std,
                        "batch_id": p.batch_id, "strategy": p.strategy,
                    },
                )
                self._counts["proposed"] += 1
                ticket = self._ticket(self.store.get_experiment(exp_id))
                self._inflight[exp_id] = ticket
                tickets.append(ticket)
        return tickets

    def _model_changed(self, version: str) -> None:
        """Record a newly fitted model in the repository with its uncertainty quality.

        The metrics are the fitted model's held-out predictions of its own labels (leave-one-out
        for a GP, out-of-bag for an ensemble: ``Engine.uncertainty_metrics``, no refits); the
        prospective metrics (each prediction made at proposal time, compared with the later
        measurement) are stored beside them under ``prospective``. Called with the engine lock held.
        """
        self._last_model_version = version
        self._model_version_id = None
        if version.startswith("design") or version.startswith("random"):
            return
        metrics: dict[str, Any] = {"prospective": self.model_metrics()}
        n_train = self.engine.n_observed
        try:
            held_out = self.engine.uncertainty_metrics()
        except SDLError as exc:  # too few held-out labels yet
            logger.info("no held-out metrics for %s: %s", version, exc)
        else:
            metrics.update({k: v for k, v in held_out.items() if not isinstance(v, list)})
            n_train = int(held_out.get("n_train", n_train))
        try:
            self._model_version_id = self.store.add_model_version(
                self.campaign_id, model=self.engine.strategy, n_train=n_train,
                metrics=metrics, info={"version": version, "seed": self.seed},
            )
        except Exception:  # noqa: BLE001 - a monitoring record must not stop the lab
            self._model_version_id = None
            logger.exception("could not record model version %s", version)

    # ------------------------------------------------------------------ resume
    def recover(self) -> list[Ticket]:
        """Tickets for the experiments a previous process left unfinished (see the module docstring)."""
        from devices.robot import reconcile

        tickets: list[Ticket] = []
        for exp in self.store.pending_experiments(self.campaign_id):
            if exp.state == "proposed":
                ticket = self._ticket(exp)
                self.event("experiment.resumed", f"experiment {exp.id} was proposed: run it",
                           experiment_id=exp.id, payload={"decision": "run"})
            else:
                ticket = self._ticket(exp)
                robot = ticket.robot
                if robot not in self.pool.roles:
                    self._abandon(ticket, f"its robot {robot!r} is not in this campaign any more")
                    continue
                with self.pool.lease(ROBOT, robot) as (_, device):
                    job = reconcile(device, ticket.job_id)
                state = job.get("state")
                decision = {"unknown": "start", "running": "wait", "done": "characterize"}.get(str(state))
                self.event("experiment.reconciled", f"experiment {exp.id}: robot {robot} says job "
                           f"{ticket.job_id} is {state}", experiment_id=exp.id,
                           payload={"job_id": ticket.job_id, "robot_state": state, "decision": decision or "end"})
                if state in ("unknown", "running"):
                    ticket.stage = "synthesis"
                elif state == "done":
                    ticket.stage = "record" if self.measured_value(exp.id) is not None else "characterization"
                elif state == "failed" and job.get("failure") == "material":
                    self._fail(ticket, str(job.get("error") or "material failure"))
                    continue
                else:
                    self._abandon(ticket, f"robot job {ticket.job_id} is {state}: {job.get('error')}")
                    continue
            with self._lock:
                self._inflight[ticket.experiment_id] = ticket
                self._recovered.add(ticket.key)
            tickets.append(ticket)
        with self._lock:
            self._check_rules()
        return tickets

    # ------------------------------------------------------------------ one experiment
    def _md(self, ticket: Ticket) -> dict[str, Any]:
        return {"sdl": {"campaign_id": self.campaign_id, "experiment_id": ticket.experiment_id},
                "campaign": self.cfg.name, "idempotency_key": ticket.key}

    def synthesize(self, ticket: Ticket) -> None:
        """Make the sample on a free robot (or the robot that knows the job).

        Raises:
            MaterialFailure: The sample is lost for a chemical reason (record it, do not retry).
            InstrumentError: An instrument fault (retry: the job id makes a retry safe).
        """
        from devices.plans import synthesize

        if ticket.stage != "synthesis":
            return
        # The repository, not the ticket, says whether a robot already has this job: a retry
        # (or a resumed experiment) must go back to that robot, never start on another one.
        record = self.store.get_experiment(ticket.experiment_id)
        known = (record.instruments or [None])[0] if record.state == "running" else None
        with self.pool.lease(ROBOT, known) as (name, robot):
            self._current[name] = ticket.experiment_id
            try:
                if known is None:
                    self.store.start_experiment(ticket.experiment_id, instruments=[name])
                    with self._lock:
                        self._counts["proposed"] -= 1
                        self._counts["running"] += 1
                ticket.robot = name
                outcome = run_plan(synthesize(robot, ticket.recipe, md=self._md(ticket)), subscribers=[self.writer], key=name)
            finally:
                self._current[name] = None
        if not outcome.ok:
            raise _as_lab_error(outcome.exception, name)
        ticket.stage = "characterization"
        self.notify()

    def characterize(self, ticket: Ticket) -> float:
        """Measure the sample on a free station; returns the objective's ``ok`` value.

        A value the station flags (drift) is kept as a flagged measurement and the sample is
        measured again, up to ``max_measure_attempts`` times.

        Raises:
            InstrumentError: An instrument fault, or no ``ok`` value after every attempt.
        """
        from devices.plans import characterize

        value = self.measured_value(ticket.experiment_id)
        if value is not None:
            ticket.stage = "record"
            return value
        for attempt in range(1, self.max_measure_attempts + 1):
            measure_job = f"{ticket.job_id}.m{attempt}"[-128:]
            recipe = {**ticket.recipe, "measure_job_id": measure_job}
            station = self._measure_jobs.get(measure_job)
            if station is None and ticket.key in self._recovered:
                station = self._station_knowing(measure_job)
            with self.pool.lease(STATION, station) as (name, device):
                self._measure_jobs[measure_job] = name
                self._current[name] = ticket.experiment_id
                try:
                    outcome = run_plan(characterize(device, recipe, md=self._md(ticket)),
                                       subscribers=[self.writer], key=name)
                finally:
                    self._current[name] = None
            if self.writer.pending:
                self.writer.retry()
            if not outcome.ok:
                raise _as_lab_error(outcome.exception, name)
            value = self.measured_value(ticket.experiment_id)
            if value is not None:
                ticket.stage = "record"
                return value
            flagged = [m for m in self.store.measurements(experiment_id=ticket.experiment_id)
                       if m.property == self.property and m.run_uid in outcome.run_uids]
            self.event("measurement.flagged",
                       f"experiment {ticket.experiment_id}: measurement {measure_job} not usable "
                       f"(quality {[m.quality for m in flagged] or 'missing'}); measuring again",
                       experiment_id=ticket.experiment_id, level="warning",
                       payload={"measure_job_id": measure_job, "qualities": [m.quality for m in flagged]})
        raise InstrumentError(
            f"no usable {self.property} measurement after {self.max_measure_attempts} attempts",
            instrument=STATION,
        )

    def _station_knowing(self, measure_job: str) -> str | None:
        """The station that already has ``measure_job`` (after a crash or a retry), if any."""
        for name in self.pool.names(STATION):
            device = self.pool.devices[name]
            try:
                reply = device.transport.command("JOB?", measure_job)
            except InstrumentError:
                continue
            if reply.data:
                return name
        return None

    def measured_value(self, experiment_id: int) -> float | None:
        """Mean of the experiment's ``ok`` measurements of the objective, or None."""
        values = [m.value for m in self.store.measurements(experiment_id=experiment_id)
                  if m.property == self.property and m.quality == "ok"]
        return sum(values) / len(values) if values else None

    def complete(self, ticket: Ticket, value: float) -> Outcome:
        """running → completed; the engine learns the value."""
        from sdl.engine import Observation

        self.store.complete_experiment(ticket.experiment_id)
        with self._engine_lock:
            self.engine.observe([Observation(key=ticket.candidate_key, params=ticket.params, value=value)])
        with self._lock:
            self._counts["running"] -= 1
            self._counts["completed"] += 1
            self._inflight.pop(ticket.experiment_id, None)
            self._record_value(ticket.experiment_id, value)
            self._check_rules()
        self.notify()
        return Outcome(ticket, "completed", value)

    def _fail(self, ticket: Ticket, reason: str) -> Outcome:
        self.store.fail_experiment(ticket.experiment_id, reason=reason, kind="material")
        with self._lock:
            self._counts["running"] -= 1
            self._counts["failed"] += 1
            self._excluded.add(ticket.candidate_key)
            self._inflight.pop(ticket.experiment_id, None)
            self._check_rules()
        self.notify()
        return Outcome(ticket, "failed", reason=reason)

    def fail(self, ticket: Ticket, error: MaterialFailure) -> Outcome:
        """running → failed (material): recorded, never retried."""
        return self._fail(ticket, str(error))

    def _abandon(self, ticket: Ticket, reason: str) -> Outcome:
        state = self.store.get_experiment(ticket.experiment_id).state
        self.store.abandon_experiment(ticket.experiment_id, reason=reason)
        with self._lock:
            self._counts[state] -= 1
            self._counts["abandoned"] += 1
            self._excluded.add(ticket.candidate_key)
            self._inflight.pop(ticket.experiment_id, None)
            self._check_rules()
        self.notify()
        return Outcome(ticket, "abandoned", reason=reason)

    def abandon(self, ticket: Ticket, error: BaseException) -> Outcome:
        """End an experiment an instrument could not finish (after retries): abandoned, never repeated.

        The robot is asked to abort the job first, so that it does not stay busy with it.
        """
        if ticket.robot is not None and ticket.stage == "synthesis":
            with contextlib.suppress(Exception):
                self.pool.devices[ticket.robot].transport.command("SYNTH ABORT", ticket.job_id)
        return self._abandon(ticket, f"{type(error).__name__}: {error}")

    # ------------------------------------------------------------------ monitoring
    def model_metrics(self) -> dict[str, Any]:
        """Prospective accuracy of the models: each completed proposal's prediction vs its measurement.

        Honest by construction: the prediction was made before the measurement existed.
        """
        from sdl.uq import uncertainty_metrics

        y, mu, sd = self._predictions()
        if len(y) < 2:
            return {"n": len(y)}
        try:
            return uncertainty_metrics(y, mu, sd)
        except ValueError as exc:
            return {"n": len(y), "error": str(exc)}

    def _predictions(self) -> tuple[list[float], list[float], list[float]]:
        ids = {eid: v for eid, v in self._values}
        y, mu, sd = [], [], []
        for exp in self.store.experiments(self.campaign_id, states=("completed",)):
            if exp.id in ids and exp.predicted_mean is not None and exp.predicted_std is not None:
                y.append(ids[exp.id])
                mu.append(exp.predicted_mean)
                sd.append(max(exp.predicted_std, 0.0))
        return y, mu, sd

    def round_due(self) -> bool:
        """True when ``retrain.every`` new measurements arrived since the last report."""
        with self._lock:
            return len(self._values) - self._reported >= int(self.cfg.retrain.every)

    def round_report(self, true_best: float | None = None) -> RoundReport:
        """Best so far, model metrics, the latest proposals' provenance, and the plots."""
        from sdl import plots

        with self._lock:
            self._reported = len(self._values)
            self._round += 1
            values = [v for _, v in self._values]
            done = self.n_ended
        best = self.best()
        metrics = self.model_metrics()
        plot_dir = self.state_dir / "plots"
        paths: dict[str, Path] = {}
        unit = f" ({self.cfg.objective.unit})" if self.cfg.objective.unit else ""
        try:
            paths["best_so_far"] = plots.plot_best_so_far(
                values, self.objective.goal, plot_dir / "best_so_far.png", ylabel=f"{self.property}{unit}")
            y, mu, sd = self._predictions()
            if len(y) >= 2:
                paths["parity"] = plots.plot_parity(y, mu, sd, plot_dir / "parity.png")
                paths["calibration"] = plots.plot_calibration(y, mu, sd, plot_dir / "calibration.png")
        except Exception:  # noqa: BLE001 - a figure must not stop the lab
            logger.exception("could not draw the plots")
        experiments = self.store.experiments(self.campaign_id)
        measured = dict(self._values)
        ranked = sorted(
            (e for e in experiments if e.id in measured),
            key=lambda e: -float(self.objective.utility(measured[e.id])),
        )
        top = [
            {"rank": i + 1, "candidate": e.candidate_key, self.property: round(measured[e.id], 6),
             "predicted": None if e.predicted_mean is None else round(e.predicted_mean, 6),
             "std": None if e.predicted_std is None else round(e.predicted_std, 6),
             "model": e.model_version, "experiment": e.id}
            for i, e in enumerate(ranked[:10])
        ]
        recent = [e for e in experiments if e.state != "proposed"][-8:]
        provenance = [
            {"experiment": e.id, "candidate": e.candidate_key, "state": e.state, "model": e.model_version,
             "acquisition": e.acquisition_value, "predicted": e.predicted_mean, "std": e.predicted_std,
             "batch": e.batch_id, "measured": measured.get(e.id)}
            for e in recent
        ]
        return RoundReport(
            round=self._round, n_observed=len(values), done=done, budget=self.budget,
            best_value=None if best is None else best.value,
            best_candidate=None if best is None else best.candidate_key,
            true_best=true_best, metrics=metrics, top=top, provenance=provenance, plots=paths,
        )

    def true_best(self) -> tuple[str, float] | None:
        """The best value a simulated world holds for the objective (to judge the campaign), or None."""
        import pandas as pd

        for inst in self.cfg.instruments:
            if inst.simulated and inst.world is not None and self.property in inst.measures:
                try:
                    frame = pd.read_csv(inst.world)
                except Exception:  # noqa: BLE001
                    return None
                if self.property not in frame.columns:
                    return None
                utility = self.objective.utility(frame[self.property].to_numpy(dtype=float))
                i = int(utility.argmax())
                row = frame.iloc[i]
                if "id" in frame.columns:
                    key = str(row["id"])
                else:  # a table world: the recorded parameters name the best point
                    names = [c for c in frame.columns if c != self.property]
                    key = ", ".join(f"{c}={row[c]:g}" if isinstance(row[c], float) else f"{c}={row[c]}"
                                    for c in names)
                return key, float(row[self.property])
        return None

    def world_rank(self, value: float | None) -> tuple[int, int] | None:
        """Rank of ``value`` among the simulated world's recorded values (1 = the best), and their count.

        Why: "best found" means little without knowing how many recorded materials beat it.
        """
        if value is None:
            return None
        import pandas as pd

        for inst in self.cfg.instruments:
            if inst.simulated and inst.world is not None and self.property in inst.measures:
                try:
                    column = pd.read_csv(inst.world)[self.property].to_numpy(dtype=float)
                except Exception:  # noqa: BLE001 - no rank is better than a crash at the end of a campaign
                    return None
                utility = self.objective.utility(column)
                better = int((utility > float(self.objective.utility([value])[0]) + 1e-12).sum())
                return better + 1, len(column)
        return None

    def finish(self) -> str:
        """Mark the campaign completed (budget reached) or stopped (another rule); returns the state."""
        reason = self.stop_reason or "nothing left to do"
        state = "completed" if reason.startswith("budget") else "stopped"
        self.store.set_campaign_state(self.campaign_id, state, reason=reason)
        return state

    # ------------------------------------------------------------------ waiting
    def notify(self) -> None:
        """Wake the flow's loop (an instrument freed or an experiment ended)."""
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until :meth:`notify` or ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)

    def close(self) -> None:
        """Close the instruments' lines."""
        for device in self.pool.devices.values():
            with contextlib.suppress(Exception):
                device.close()


def _as_lab_error(exc: BaseException | None, instrument: str) -> BaseException:
    """Material failures stay; instrument errors stay; anything else is an instrument fault."""
    if isinstance(exc, (MaterialFailure, InstrumentError)):
        return exc
    return InstrumentError(f"plan failed: {type(exc).__name__}: {exc}", instrument=instrument)


@contextlib.contextmanager
def open_lab(
    cfg: Any,
    database_url: str,
    *,
    budget: int | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
    state_dir: Path | None = None,
) -> Iterator[Lab]:
    """Open the repository, start simulators, connect the instruments, build the engine.

    Everything is closed (and the simulators stopped) when the block ends, even on error.

    Args:
        cfg: The loaded campaign.
        database_url: Repository URL (migrated to head on open).
        budget: Overrides ``cfg.budget.experiments``.
        seed: Overrides ``cfg.seed`` (engine and simulators).
        time_scale: Overrides every simulator's time scale.
        state_dir: Journals and plots (default: :func:`state_dir_for` the database / campaign).
    """
    from devices.robot import SynthesisRobot
    from devices.station import CharacterizationStation
    from sdl.engine import Engine
    from sdl.repository import Store
    from sdl.simulation import SimulatorFleet

    if seed is not None and seed != cfg.seed:
        cfg = cfg.model_copy(update={"seed": int(seed)})
    if not cfg.instruments:
        raise SDLError(f"campaign {cfg.name!r} lists no instruments: it can be validated and benchmarked, not run")
    state_dir = Path(state_dir) if state_dir else state_dir_for(database_url) / cfg.name
    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store.from_url(database_url, create=True)
    fleet = SimulatorFleet(state_dir, cfg.name, time_scale=time_scale)
    lab: Lab | None = None
    try:
        urls = fleet.start(cfg.instruments, seed=cfg.seed)
        with_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if with_threads:
            import torch

            torch.set_num_threads(with_threads)
        from sdl.models.embedding_store import EmbeddingStore, default_store_path

        engine = Engine.from_campaign(cfg, embedding_store=EmbeddingStore(default_store_path(database_url)))
        engine.prepare(progress=_featurize_logger(cfg.name))
        devices: dict[str, tuple[str, Any]] = {}
        lab = Lab(cfg, store, engine, InstrumentPool({}), budget=budget, seed=cfg.seed, state_dir=state_dir)
        for inst in cfg.instruments:
            url = urls.get(inst.name) or inst.url
            options = dict(inst.options)
            common = dict(name=inst.name, url=url, line_timeout=inst.timeout_s,
                          on_fault=lab.fault_callback(inst.name), **options)
            if inst.role == ROBOT:
                devices[inst.name] = (ROBOT, SynthesisRobot(**common))
            else:
                devices[inst.name] = (STATION, CharacterizationStation(properties=list(inst.measures), **common))
        lab.pool = InstrumentPool(devices, on_release=lab.notify)
        lab.start()
        yield lab
    finally:
        if lab is not None:
            lab.close()
        fleet.stop()
        store.close()


def _featurize_logger(campaign: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that logs featurising progress about every 10 %."""
    last = [-1]

    def report(done: int, total: int) -> None:
        step = int(10 * done / max(1, total))
        if step != last[0]:
            last[0] = step
            logger.info("campaign %s: featurising candidates %d / %d", campaign, done, total)

    return report


def with_retries(step: Callable[[Ticket], Any], attempts: int = 3, delay: float = 0.1) -> Callable[[Ticket], Any]:
    """Plain-Python stand-in for a Prefect task's retries: retry ``step`` on instrument faults only."""

    def run(ticket: Ticket) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return step(ticket)
            except InstrumentError as exc:
                if attempt == attempts:
                    raise
                logger.warning("experiment %d: %s; retry %d of %d", ticket.experiment_id, exc, attempt,
                               attempts - 1)
                time.sleep(delay * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    return run


def run_experiment(
    lab: Lab,
    ticket: Ticket,
    *,
    synthesize: Callable[[Ticket], Any] | None = None,
    characterize: Callable[[Ticket], float] | None = None,
) -> Outcome:
    """Carry one experiment to its end state: synthesis, characterization, record.

    Args:
        lab: The campaign's lab.
        ticket: The experiment (``stage`` says where a resumed experiment starts).
        synthesize: The synthesis step (default :meth:`Lab.synthesize`; the flow passes a Prefect
            task with retries). Must raise ``MaterialFailure`` / ``InstrumentError``.
        characterize: The characterization step, returning the ``ok`` value.

    Returns:
        ``completed``; ``failed`` for a material failure (never retried); ``abandoned`` when an
        instrument fault outlived the retries.
    """
    synthesize = synthesize or lab.synthesize
    characterize = characterize or lab.characterize
    try:
        if ticket.stage == "synthesis":
            synthesize(ticket)
            ticket.stage = "characterization"
            lab.notify()
        if ticket.stage == "record":
            value = lab.measured_value(ticket.experiment_id)
            if value is None:
                ticket.stage = "characterization"
        if ticket.stage == "characterization":
            value = characterize(ticket)
        assert value is not None
        return lab.complete(ticket, value)
    except MaterialFailure as exc:
        lab.event("experiment.material_failure", str(exc), experiment_id=ticket.experiment_id, level="warning")
        return lab.fail(ticket, exc)
    except InstrumentError as exc:
        lab.event("experiment.instrument_failure", str(exc), experiment_id=ticket.experiment_id, level="error")
        return lab.abandon(ticket, exc)


def drive(
    lab: Lab,
    submit: Callable[[Ticket], Any],
    on_done: Callable[[Ticket, Any], None],
    *,
    propose: Callable[[int], list[Ticket]] | None = None,
    poll: float = 0.5,
) -> None:
    """The closed loop: resume, then propose one experiment per free robot until a rule stops it.

    Args:
        lab: The campaign's lab (already started).
        submit: Starts one experiment concurrently (e.g. a Prefect task's ``submit``) and returns
            a future-like object with ``done()``.
        on_done: Called in this thread for each finished future (progress, artifacts); may raise
            to stop the campaign (it then stays resumable).
        propose: Proposes ``n`` experiments (default :meth:`Lab.propose`; the flow passes a task).
        poll: Longest wait between two looks at the futures (an instrument freeing wakes it earlier).
    """
    propose = propose or lab.propose
    running: dict[Any, Ticket] = {}
    for ticket in lab.recover():
        running[submit(ticket)] = ticket
    while True:
        wanted = lab.wanted()
        for ticket in propose(wanted) if wanted else []:
            running[submit(ticket)] = ticket
        done = [f for f in running if f.done()]
        for future in done:
            on_done(running.pop(future), future)
        if not running and lab.wanted() == 0:
            break
        if not done:
            lab.wait_for_change(poll)


def run_plain(lab: Lab, *, on_outcome: Callable[[Outcome], None] | None = None, retries: int = 3) -> None:
    """Run the whole campaign without Prefect (threads, plain retries): tests and scripts."""
    workers = lab.pool.count(ROBOT) + lab.pool.count(STATION)
    synth, char = with_retries(lab.synthesize, retries), with_retries(lab.characterize, retries)

    def done(ticket: Ticket, future: Future[Any]) -> None:
        outcome = future.result()
        if on_outcome is not None:
            on_outcome(outcome)

    with ThreadPoolExecutor(max_workers=max(2, workers), thread_name_prefix="experiment") as executor:
        drive(lab, lambda t: executor.submit(run_experiment, lab, t, synthesize=synth, characterize=char), done)
    lab.finish()
