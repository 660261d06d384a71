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

Counting, batching and the stopping rules live in :mod:`sdl.lab.ledger`; the instrument port,
the pool and outages in :mod:`sdl.lab.instruments`; the loop that drives experiments in
:mod:`sdl.lab.loop`. An instrument that cannot be reached holds its experiments (their state stays
in the repository) for its outage window, then the campaign fails; an interrupt either lets started
jobs finish (SIGINT) or aborts them on the instruments and records them abandoned (a second SIGINT,
or SIGTERM); experiments not yet started stay ``proposed`` for the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdl.engine.objectives import Objective
from sdl.exceptions import InstrumentError, MaterialFailure, SDLError
from sdl.lab.alerts import CampaignAlerts
from sdl.lab.approval import ApprovalChannel, wait_for_approval
from sdl.lab.instruments import (
    ROBOT,
    STATION,
    InstrumentPool,
    InstrumentPort,
    OutageGuard,
    is_outage,
    load_driver,
)
from sdl.lab.ledger import HANDS, ExperimentLedger, StoppingPolicy, asked_by_hand
from sdl.lab.runner import RunOutcome, run_plan, warm_up
from sdl.repository.control import link_approval
from sdl.repository.schema import utcnow
from sdl.repository.store import to_jsonable
from sdl.steps import step

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from devices.phase_detector import XRDPhaseDetector
    from sdl.config import CampaignConfig
    from sdl.engine import Engine, Proposal
    from sdl.generation.growth import PoolGrowth
    from sdl.lab.control import LabControl
    from sdl.repository.store import BestRecord, CampaignRecord, ExperimentRecord, Store
    from sdl.xrd import PhaseTable

__all__ = [
    "Interrupted",
    "Lab",
    "Outcome",
    "RoundReport",
    "Ticket",
    "campaign_token",
    "job_id_for",
    "open_lab",
    "state_dir_for",
]

logger = logging.getLogger(__name__)


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

    from sdl.settings import settings

    configured = settings().state_dir
    if configured is not None:
        return configured.expanduser().resolve()

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
    fresh: bool = False
    """Proposed by this process and not yet tried: no instrument can know it, nothing is measured."""
    tried: set[str] = field(default_factory=set)
    """Steps (``synthesis``, ``characterization``) already attempted in this process."""

    def first_try(self, step: str) -> bool:
        """Whether this is the first attempt of ``step`` of a fresh experiment (no read-back needed)."""
        first = self.fresh and step not in self.tried
        self.tried.add(step)
        return first


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


class Interrupted(SDLError):
    """The run was asked to stop (SIGINT / SIGTERM).

    ``aborted``: a job was aborted on its instrument (the experiment is abandoned); otherwise the
    experiment had not started its next step and keeps its state for the next run.
    """

    def __init__(self, message: str, *, aborted: bool = False) -> None:
        super().__init__(message)
        self.aborted = aborted


class Lab:
    """One campaign's laboratory: repository, engine, instruments and the ledger that ties them.

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
        amend: Accept a YAML that differs from the stored campaign of the same name (recorded as an event).
    """

    def __init__(
        self,
        cfg: CampaignConfig,
        store: Store,
        engine: Engine,
        pool: InstrumentPool,
        *,
        budget: int | None = None,
        seed: int | None = None,
        state_dir: Path | None = None,
        max_measure_attempts: int = 3,
        amend: bool = False,
    ) -> None:
        from sdl.lab.documents import RepositoryWriter

        self.cfg = cfg
        self.store = store
        self.engine = engine
        self.pool = pool
        self.budget = int(budget if budget is not None else cfg.budget.experiments)
        self.seed = int(seed if seed is not None else cfg.seed)
        self.state_dir = Path(state_dir) if state_dir else Path.cwd() / "sdl-runs" / cfg.name
        self.objective = Objective.from_any(cfg.objective)
        self.property = cfg.objective.property
        self.properties = cfg.modelled_properties  # the objectives', then constrained ones (one: the objective)
        self.max_measure_attempts = max_measure_attempts
        self.amend = amend
        # No second schema check: the RunEngine composes every document with event_model, which
        # validates it (compose_* validate=True); a check here cost ~1 ms per document.
        self.writer = RepositoryWriter(store, validate=False)
        self.pool.on_release = self.notify
        self.ledger = ExperimentLedger(self.objective, StoppingPolicy(
            budget=self.budget, batch_size=int(cfg.acquisition.batch_size), mode=cfg.acquisition.mode,
            goal_value=cfg.stopping.goal_value, patience=cfg.stopping.patience,
            max_failures=cfg.budget.max_failures, max_abandoned=cfg.budget.max_abandoned,
        ), improvement=self._pareto_progress())
        self.guard = OutageGuard({i.name: i.outage_window_s for i in cfg.instruments}, on_change=self._outage_event)
        self.pool.guard = self.guard
        self._engine_lock = threading.Lock()
        self._changed = threading.Condition()
        self._tickets: dict[int, Ticket] = {}
        self._current: dict[str, tuple[int, str] | None] = {}  # instrument → (experiment, job) it works on
        self._reported = 0
        self._round = 0
        self._last_model_version: str | None = None
        self._model_version_id: int | None = None  # repository row of the model behind new proposals
        self._measure_jobs: dict[str, str] = {}  # measurement job id → station that has it
        self._materials: dict[str, int] = {}  # candidate key → its materials row
        self._recovered: set[str] = set()  # keys of experiments a previous process left unfinished
        self.interrupted: str | None = None  # "drain" or "abort" once a signal asked the run to stop
        self.phase_detectors: dict[str, XRDPhaseDetector] = {}  # station → XRD phase identification
        self.control: LabControl | None = None  # pause / resume / cancel requests (sdl/lab/control.py)
        self.approval_channels: list[ApprovalChannel] = []  # where else a batch may be approved (Prefect UI)
        self._opened_at = utcnow()
        self.campaign_id = 0
        self._token = ""
        self.alerts = CampaignAlerts(self)  # cfg.notifications: failed, instrument gone, goal, budget
        self.growth: PoolGrowth | None = None
        if cfg.search_space.generate is not None:
            from sdl.generation.growth import PoolGrowth

            self.growth = PoolGrowth(cfg.search_space.generate, batch_size=int(cfg.acquisition.batch_size))

    # ------------------------------------------------------------------ campaign and engine
    def start(self) -> None:
        """Get or create the campaign row and teach the engine everything already measured.

        Raises:
            CampaignConfigChanged: The YAML differs from the stored campaign (unless ``amend``).
        """
        record = self.load()
        if record.state != "running":
            self.store.set_campaign_state(record.id, "running", reason="sdl run (resume)")
        self.alerts.started()
        from sdl.lab import interrupts

        interrupts.register(self)
        self._start_control()
        counts = self.ledger.counts()
        logger.info(
            "campaign %r (id %d): %d completed, %d failed, %d abandoned, %d pending; budget %d",
            self.cfg.name, self.campaign_id, counts["completed"], counts["failed"], counts["abandoned"],
            counts["proposed"] + counts["running"], self.budget,
        )

    def load(self) -> CampaignRecord:
        """Get or create the campaign row, teach the engine everything measured, rebuild the ledger.

        What :meth:`start` does without claiming the campaign for a run: ``sdl ask`` shares it, so
        that hands and instruments agree on the config hash, the amend rule and the counts.

        Raises:
            CampaignConfigChanged: The YAML differs from the stored campaign (unless ``amend``).
        """
        import sdl
        from sdl.engine import Observation
        from sdl.lab.transfer import load_related

        related = load_related(self.cfg, self.store)  # a bad source fails before the campaign row exists
        record = self.store.get_or_create_campaign(
            self.cfg.name,
            snapshot=self.cfg.snapshot(),
            config_hash=self.cfg.config_hash(),
            seed=self.seed,
            budget=self.budget,
            description=self.cfg.description,
            code_version=sdl.__version__,
            amend=self.amend,
        )
        self.campaign_id = record.id
        self._token = campaign_token(record)
        if self.growth is not None:  # candidates generated by an earlier run must be in the pool again
            restored = self.growth.restore(self.engine, self.store, self.campaign_id)
            if restored:
                logger.info("campaign %r: %d generated candidates back in the pool", self.cfg.name, restored)
        from sdl.lab.computations import restore_computed

        restore_computed(self.engine, self.store, self.campaign_id)  # cheap sources computed before (fidelities)
        observations = self.store.observations(self.campaign_id, self.property)
        others = {p: {o.experiment_id: o.value for o in self.store.observations(self.campaign_id, p)}
                  for p in self.properties[1:]}
        if observations:
            self.engine.observe(
                [Observation(key=o.candidate_key, params=o.params, value=o.value,
                             values={p: v[o.experiment_id] for p, v in others.items() if o.experiment_id in v})
                 for o in observations]
            )
        if related is not None and self.cfg.transfer is not None:  # seeds the model; never an experiment
            self.engine.add_related(related, skip_measured=self.cfg.transfer.skip_measured)
        experiments = self.store.experiments(self.campaign_id)  # read after the values: never a value twice
        self._learn_failures([e.candidate_key for e in experiments
                              if e.state == "failed" and e.failure_kind == "material"])
        self.ledger.load(((e.id, e.candidate_key, e.state) for e in experiments),
                         ((o.experiment_id, o.value) for o in observations))
        for e in experiments:  # a person's experiments in flight: tracked now, so any later tell is learnt
            if e.state in ("proposed", "running") and asked_by_hand(e.provenance_extra):
                self.ledger.track(e.id, e.candidate_key, e.state, e.batch_id, by_hand=True)
        self._reported = len(observations)
        return record

    def _start_control(self) -> None:
        """Pause / cancel requests of this run; dropped proposals stay out; stale approvals go."""
        from sdl.lab.control import LabControl
        from sdl.repository.control import approvals, supersede_pending

        self.control = LabControl(self, started_at=self._opened_at)
        supersede_pending(self.store, self.campaign_id, "a new run proposes again")
        for dropped in approvals(self.store, self.campaign_id, decision="dropped"):
            self.ledger.exclude(dropped.candidate_key)

    def poll_control(self) -> None:
        """Act on pause / resume / cancel requests (the loop calls it every turn; reads ~1/s)."""
        if self.control is not None:
            self.control.poll()

    @property
    def paused(self) -> bool:
        """Paused by ``sdl pause``: nothing new is proposed or started until ``sdl resume``."""
        return self.control is not None and self.control.paused

    def check_instruments(self) -> None:
        """Ask every instrument whether it is there before any experiment is proposed.

        An instrument that cannot be reached is waited for (its outage window); then the campaign
        fails before it spends anything.

        Raises:
            InstrumentOutage: An instrument stayed unreachable for its whole window.
            InstrumentError: An instrument answers but not as an SDL/1 instrument should.
        """
        for device in self.pool.devices.values():
            try:
                device.ping()
            except InstrumentError as exc:
                if not is_outage(exc):
                    raise
                self.guard.wait_until_up(device, exc)

    def event(self, kind: str, message: str, *, experiment_id: int | None = None,
              level: str = "info", payload: dict[str, Any] | None = None) -> None:
        """Append to the repository's event log (never raises: monitoring must not stop the lab)."""
        try:
            self.store.log_event(kind, message, campaign_id=self.campaign_id or None,
                                 experiment_id=experiment_id, level=level, payload=payload)
        except Exception:
            logger.exception("could not log event %s", kind)

    def _outage_event(self, instrument: str, what: str, message: str) -> None:
        level = "info" if what == "up" else "error"
        self.event(f"instrument.{what}", message, level=level, payload={"instrument": instrument})
        self.alerts.instrument_event(instrument, what, message)

    def fault_callback(self, instrument: str) -> Callable[[str, str], None]:
        """``on_fault`` for an instrument's transport: every line fault goes to the event log."""

        def on_fault(kind: str, message: str) -> None:
            if "JOB?" in message and "NOT_FOUND" in message:
                return  # asking about a job the instrument never saw is a question, not a fault
            current = self._current.get(instrument)
            self.event(
                "instrument.fault", f"{instrument}: {kind}: {message}",
                experiment_id=current[0] if current else None, level="warning",
                payload={"instrument": instrument, "fault": kind, "message": message},
            )

        return on_fault

    def lease_lost(self, error: BaseException) -> None:
        """Another runner took this campaign over: stop at once, fail loudly."""
        self.ledger.fail(f"lost the campaign lease: {error}")
        self.pool.close_leases(str(error))
        self.notify()

    # ------------------------------------------------------------------ the ledger's answers
    @property
    def n_ended(self) -> int:
        """Experiments in an end state (what the budget counts)."""
        return self.ledger.n_ended

    @property
    def stop_reason(self) -> str | None:
        """Why the campaign stops (a failure first)."""
        return self.ledger.failure or self.ledger.stop_reason

    def counts(self) -> dict[str, int]:
        """Experiments per state, as this process knows them (the repository agrees)."""
        return self.ledger.counts()

    def wanted(self) -> int:
        """How many experiments to propose now (see :meth:`ExperimentLedger.wanted`); none while paused.

        Results told by hand since the last look are learnt first (:meth:`sync_hands`), so the
        next proposal and the stopping rules know them.
        """
        self.sync_hands()
        return 0 if self.paused else self.ledger.wanted(self.pool.count(ROBOT))

    def sync_hands(self) -> int:
        """Learn what ``sdl tell`` recorded, while this run went on, for experiments asked by hand.

        The repository is the source of truth: each by-hand experiment in flight is read back; one
        that ended is ended in the ledger (and a completed one observed by the engine). Returns how
        many ended.
        """
        from sdl.engine import Observation

        ended = 0
        for entry in self.ledger.by_hand():
            record = self.store.get_experiment(entry.experiment_id)
            if record is None or record.state == entry.state:
                continue
            if record.state == "running":
                self.ledger.started(record.id)
                continue
            value = self.measured_value(record.id) if record.state == "completed" else None
            others: dict[str, float] = {}
            if record.state == "completed":
                if value is None:
                    continue
                others = self.other_values(record.id)  # several objectives: told with the first, in one transaction
                with self._engine_lock:
                    self.engine.observe([Observation(key=record.candidate_key, params=dict(record.params or {}),
                                                     value=value, values=others)])
            elif record.state == "failed" and record.failure_kind == "material":
                self._learn_failures([record.candidate_key])
            self.ledger.ended(record.id, record.state, from_state=entry.state, candidate_key=record.candidate_key,
                              value=value)
            self.event("experiment.learnt", f"experiment {record.id} ({record.candidate_key}) {record.state} by hand"
                       + ("" if value is None else f": {self.property} = {value:g}")
                       + "".join(f", {p} = {v:g}" for p, v in others.items()),
                       experiment_id=record.id, payload={"state": record.state, "value": value,
                                                         **({"values": others} if others else {})})
            ended += 1
        return ended

    def finished(self) -> bool:
        """True when nothing is in flight and no more experiments will be proposed."""
        return self.ledger.done()

    def best(self) -> BestRecord | None:
        """The best completed experiment or None."""
        return self.store.best_so_far(
            self.campaign_id, self.property, self.objective.goal, self.objective.target_range
        )

    def _expected_improvement(self, proposals: Sequence[Proposal]) -> float | None:
        """Largest closed-form expected improvement (in utility) of a model-based batch, else None."""
        from scipy.stats import norm

        best = self.ledger.best_value
        if best is None or self.objective.goal == "target":
            return None
        best_utility = float(self.objective.utility([best])[0])
        sign = 1.0 if self.objective.goal == "maximize" else -1.0
        largest = None
        for p in proposals:
            if p.predicted_mean is None or p.predicted_std is None:
                return None
            mu, sd = sign * p.predicted_mean, max(float(p.predicted_std), 1e-12)
            z = (mu - best_utility) / sd
            ei = sd * float(norm.pdf(z)) + (mu - best_utility) * float(norm.cdf(z))
            largest = ei if largest is None else max(largest, ei)
        return largest

    # ------------------------------------------------------------------ interrupts
    def interrupt(self, kind: str, why: str) -> None:
        """Stop the run: ``drain`` lets started jobs finish, ``abort`` aborts them on the instruments.

        Experiments not yet started keep their ``proposed`` state; the next run resumes them.
        """
        if kind == "drain" and self.interrupted is None:
            self.interrupted = "drain"
            self.ledger.stop(f"interrupted ({why}): finishing the experiments in flight")
            self.event("campaign.interrupted", f"{why}: finishing the experiments in flight", level="warning")
        elif kind == "abort" and self.interrupted != "abort":
            self.interrupted = "abort"
            self.ledger.stop(f"interrupted ({why}): jobs in flight aborted")
            self.event("campaign.interrupted", f"{why}: aborting the jobs in flight", level="warning")
            self.guard.cancel()
            for name, current in list(self._current.items()):
                if current is not None:
                    with contextlib.suppress(Exception):
                        self.pool.devices[name].abort(current[1])
        self.notify()

    def _check_interrupt(self, stage: str) -> None:
        if self.interrupted == "abort" or (self.interrupted == "drain" and stage == "synthesis"):
            raise Interrupted(f"run interrupted before {stage}")

    # ------------------------------------------------------------------ pool growth
    def grow_pool(self) -> int:
        """Between rounds, add generated candidates to the pool (``search_space.generate``); 0 when not due.

        A generation failure is logged as an event and never stops the campaign.
        """
        if self.growth is None or not self.growth.due(self.ledger.counts()["completed"]):
            return 0
        with self._engine_lock:
            try:
                grown = self.growth.grow(self.engine, self.store, self.campaign_id, self.ledger.counts()["completed"])
            except Exception as exc:
                logger.exception("pool growth failed")
                self.event("pool.growth_failed", f"pool growth failed: {exc}", level="warning")
                return 0
        logger.info("campaign %r: pool grown by %d candidates from %s", self.cfg.name, len(grown.added),
                    ", ".join(grown.parents))
        return len(grown.added)

    # ------------------------------------------------------------------ proposals
    def recipe_for(self, candidate_key: str, params: dict[str, Any], job_id: str) -> dict[str, Any]:
        """What the robot is told: a crystal candidate id, or process parameters."""
        candidates = self.cfg.search_space.candidates
        if candidates is not None and candidates.structure_column:
            return {"job_id": job_id, "candidate": candidate_key}
        return {"job_id": job_id, "params": dict(params)}

    def _ticket(self, exp: ExperimentRecord, stage: str = "synthesis") -> Ticket:
        job_id = job_id_for(exp.idempotency_key, self._token)
        return Ticket(
            experiment_id=exp.id, key=exp.idempotency_key, job_id=job_id, candidate_key=exp.candidate_key,
            params=dict(exp.params or {}), recipe=self.recipe_for(exp.candidate_key, dict(exp.params or {}), job_id),
            stage=stage, robot=exp.instruments[0] if exp.instruments else None, predicted_mean=exp.predicted_mean,
            predicted_std=exp.predicted_std, acquisition_value=exp.acquisition_value, batch_id=exp.batch_id,
            model_version=exp.model_version,
        )

    def _material_id(self, candidate_key: str, params: dict[str, Any]) -> int | None:
        """The ``materials`` row of a candidate (crystals de-duplicated by structure, recipes by key).

        Cached per candidate key: a key names one crystal (or one recipe) for the pool's lifetime
        and material rows are never edited, so a second proposal of it needs no matcher. A crystal
        is stored with its CIF text, so a later campaign (or a resumed one) on the same candidate
        file finds it by that text (:meth:`Store.material_of_cif`) before parsing and matching.
        """
        cached = self._materials.get(candidate_key)
        if cached is not None:
            return cached
        pool = self.engine.pool
        try:
            if pool is not None and pool.structure_column is not None and candidate_key in pool:
                index = pool.index_of(candidate_key)
                cif = pool.structure_texts([index])[0] if pool.structure_format == "cif" else None
                formula = pool.params(index).get("formula") if pool.formula_column else None
                material = None
                if cif is not None and formula:
                    material = self.store.material_of_cif(cif, formula=formula, source_id=candidate_key)
                if material is None:
                    structure = pool.structures([index])[0]
                    material = self.store.material_for_structure(structure, source_id=candidate_key, cif=cif)
            else:
                material = self.store.material_for_params(params or {"candidate": candidate_key})
        except Exception:
            logger.exception("could not link candidate %s to a material", candidate_key)
            return None
        self._materials[candidate_key] = material
        return material

    def propose(self, n: int, *, asked_by: str | None = None) -> list[Ticket]:
        """Ask the engine for ``n`` experiments as one q-batch and commit each as ``proposed``.

        Pending for the engine: proposed and running experiments. Failed and abandoned candidates
        are excluded from the pool, not pending. With ``acquisition.approval: required`` the batch
        first waits for a person (:mod:`sdl.lab.approval`); only what they accept is committed (a
        batch asked by hand is approved by the person who asked it).

        Args:
            n: Batch size.
            asked_by: Who asked for them by hand (``sdl ask``): recorded in their provenance
                (``source: hands``), so that no instrument ever runs them.
        """
        from sdl.exceptions import EngineError

        if n <= 0:
            return []
        from sdl.lab.computations import experiments_only

        with self._engine_lock:
            try:
                def ask() -> list[Proposal]:
                    return self.engine.propose(q=n, pending=self.ledger.pending_keys(),
                                               exclude=self.ledger.excluded_keys())

                proposals = experiments_only(self.engine, ask(), ask, self.store, self.campaign_id, self.property,
                                             lambda m: self.event("fidelity.computed", m))
            except EngineError as exc:
                self.ledger.stop(f"engine cannot propose: {exc}")
                self.event("campaign.stopping", str(self.stop_reason), level="warning")
                return []
            version = self.engine.model_version
            if version != self._last_model_version:
                # Under the engine lock: metrics and the training count describe one fitted model.
                self._model_changed(version)
            model_version_id = self._model_version_id
        threshold = self.cfg.stopping.min_expected_improvement
        ei = None if threshold is None else self._expected_improvement(proposals)  # only the rule reads it
        if threshold is not None and ei is not None and ei < threshold and self.ledger.counts()["completed"] > 0:
            self.ledger.stop(f"expected improvement {ei:.3g} below {threshold}")
            self.event("campaign.stopping", str(self.stop_reason))
            return []
        chosen: list[tuple[Proposal, int | None]] = [(p, None) for p in proposals]
        if self.cfg.acquisition.approval == "required" and asked_by is None:
            chosen = list(wait_for_approval(self, proposals, self.approval_channels))
        tickets = []
        for p, approval_id in chosen:
            key = f"{self.cfg.name}:{self.ledger.n_total + 1}"
            exp_id = self.store.propose_experiment(
                self.campaign_id, idempotency_key=key, candidate_key=p.key, params=p.params,
                material_id=self._material_id(p.key, dict(p.params or {})),
                provenance={
                    "model_version": p.model_version, "model_version_id": model_version_id,
                    "acquisition_value": p.acquisition_value,
                    "predicted_mean": p.predicted_mean, "predicted_std": p.predicted_std,
                    "batch_id": p.batch_id, "strategy": p.strategy,
                    **({"p_success": p.p_success} if p.p_success is not None else {}),
                    **({"predicted": {k: {"mean": m, "std": sd} for k, (m, sd) in p.predictions.items()}}
                       if p.predictions else {}),
                    **({"source": HANDS, "asked_by": asked_by} if asked_by is not None else {}),
                },
            )
            self.ledger.track(exp_id, p.key, "proposed", p.batch_id, new=True, by_hand=asked_by is not None)
            self.writer.link_experiment(exp_id, self.campaign_id)
            if approval_id is not None:
                link_approval(self.store, approval_id, exp_id)
            job_id = job_id_for(key, self._token)
            params = to_jsonable(dict(p.params or {}))  # as stored (numpy scalars made plain)
            ticket = Ticket(  # what was just committed: no read-back
                experiment_id=exp_id, key=key, job_id=job_id, candidate_key=p.key, params=params,
                recipe=self.recipe_for(p.key, params, job_id), predicted_mean=p.predicted_mean,
                predicted_std=p.predicted_std, acquisition_value=p.acquisition_value, batch_id=p.batch_id,
                model_version=p.model_version, fresh=True,
            )
            self._tickets[exp_id] = ticket
            tickets.append(ticket)
        return tickets

    def _model_changed(self, version: str) -> None:
        """Record a newly fitted model in the repository with its uncertainty quality.

        The metrics are the fitted model's held-out predictions of its own labels (leave-one-out
        for a GP, out-of-bag for an ensemble: ``Engine.uncertainty_metrics``, no refits); the
        prospective metrics (each prediction made at proposal time, compared with the later
        measurement) are stored beside them under ``prospective``. Called with the engine lock held,
        so the training count and the metrics describe the same fitted model.
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
        info: dict[str, Any] = {"version": version, "seed": self.seed}
        related = self.engine.related
        if related is not None:  # warm start: which earlier campaigns the model also learnt from
            info["transfer"] = {"campaigns": list(related.task_names), "measurements": len(related)}
        try:
            self._model_version_id = self.store.add_model_version(
                self.campaign_id, model=self.engine.strategy, n_train=n_train, metrics=metrics, info=info,
            )
        except Exception:
            self._model_version_id = None
            logger.exception("could not record model version %s", version)

    # ------------------------------------------------------------------ resume
    def recover(self) -> list[Ticket]:
        """Tickets for the experiments a previous process left unfinished (see the module docstring)."""
        tickets: list[Ticket] = []
        for exp in self.store.pending_experiments(self.campaign_id):
            if asked_by_hand(exp.provenance_extra):  # a person's (tracked by load): never run here
                continue
            ticket = self._ticket(exp)
            self.ledger.track(exp.id, exp.candidate_key, exp.state, exp.batch_id)
            if exp.state == "proposed":
                self.event("experiment.resumed", f"experiment {exp.id} was proposed: run it",
                           experiment_id=exp.id, payload={"decision": "run"})
            else:
                robot = ticket.robot
                if robot is None or robot not in self.pool.roles:
                    self._abandon(ticket, f"its robot {robot!r} is not in this campaign any more")
                    continue
                with self.pool.lease(ROBOT, robot) as (_, device):
                    job = device.job(ticket.job_id)
                state = job.get("state")
                decision = {"unknown": "start", "running": "wait", "done": "characterize"}.get(str(state))
                self.event("experiment.reconciled", f"experiment {exp.id}: robot {robot} says job "
                           f"{ticket.job_id} is {state}", experiment_id=exp.id,
                           payload={"job_id": ticket.job_id, "robot_state": state, "decision": decision or "end"})
                if state in ("unknown", "running"):
                    ticket.stage = "synthesis"
                elif state == "done":
                    ticket.stage = "record" if self.measured_value(exp.id) is not None else "characterization"
                    self._record_sample(ticket, device, job)
                elif state == "failed" and job.get("failure") == "material":
                    self._fail(ticket, str(job.get("error") or "material failure"))
                    continue
                else:
                    self._abandon(ticket, f"robot job {ticket.job_id} is {state}: {job.get('error')}")
                    continue
            self._tickets[ticket.experiment_id] = ticket
            self._recovered.add(ticket.key)
            tickets.append(ticket)
        self.ledger.check_rules()
        return tickets

    # ------------------------------------------------------------------ one experiment
    def _md(self, ticket: Ticket) -> dict[str, Any]:
        return {"sdl": {"campaign_id": self.campaign_id, "experiment_id": ticket.experiment_id},
                "campaign": self.cfg.name, "idempotency_key": ticket.key}

    def _run_on(self, name: str, device: InstrumentPort, ticket: Ticket, job_id: str,
                plan: Iterable[Any]) -> RunOutcome:
        """Run ``plan`` on ``device`` for ``ticket`` (abortable by :meth:`interrupt`)."""
        self._current[name] = (ticket.experiment_id, job_id)
        try:
            return run_plan(plan, subscribers=[self.writer], key=name)
        finally:
            self._current[name] = None

    def _held(self, name: str, error: BaseException) -> bool:
        """After a failed plan: wait out an outage of ``name`` (True: try again), else False."""
        if not is_outage(error) or self.interrupted is not None:
            return False
        self.guard.wait_until_up(self.pool.devices[name], error)  # raises InstrumentOutage after the window
        return True

    def synthesize(self, ticket: Ticket) -> None:
        """Make the sample on a free robot (or the robot that knows the job).

        An unreachable robot holds the experiment (outage window), then the campaign fails.

        Raises:
            MaterialFailure: The sample is lost for a chemical reason (record it, do not retry).
            InstrumentError: An instrument fault (retry: the job id makes a retry safe).
            InstrumentOutage: The robot stayed unreachable for its outage window.
            Interrupted: The run is stopping; the experiment keeps its state.
        """
        from devices.plans import synthesize

        if ticket.stage != "synthesis":
            return
        first = ticket.first_try("synthesis")
        while True:
            self._check_interrupt("synthesis")
            # The repository, not the ticket, says whether a robot already has this job: a retry
            # (or a resumed experiment) must go back to that robot, never start on another one.
            # Only a fresh experiment's first attempt is known to be on no robot yet.
            known = None
            if not first:
                record = self.store.get_experiment(ticket.experiment_id)
                assert record is not None
                known = record.instruments[0] if record.state == "running" and record.instruments else None
            first = False
            with self.pool.lease(ROBOT, known) as (name, robot):
                if known is None:
                    self._check_interrupt("synthesis")
                    self.store.start_experiment(ticket.experiment_id, instruments=[name])
                    self.ledger.started(ticket.experiment_id)
                ticket.robot = name
                outcome = self._run_on(name, robot, ticket, ticket.job_id,
                                       synthesize(robot, ticket.recipe, md=self._md(ticket)))  # type: ignore[arg-type]
                if outcome.ok:
                    self._record_sample(ticket, robot, None)
            if outcome.ok:
                break
            error = _as_lab_error(outcome.exception, name)
            if not self._held(name, error):
                if self.interrupted == "abort":
                    raise Interrupted(f"synthesis aborted: {error}", aborted=True) from error
                raise error
        ticket.stage = "characterization"
        self.notify()

    def _record_sample(self, ticket: Ticket, robot: InstrumentPort, job: dict[str, Any] | None) -> None:
        """The robot made a sample: its ``samples`` row, and the station is told which sample to measure."""
        uid = ""
        if job is not None:
            uid = str(((job.get("result") or {}).get("sample") or {}).get("id") or "")
        else:
            signal = getattr(robot, "sample", None)
            uid = str(signal.get()) if signal is not None else ""
        uid = uid or ticket.job_id
        try:
            self.store.add_sample(ticket.experiment_id, instrument=robot.name, sample_uid=uid)
        except Exception:
            logger.exception("could not record sample %s of experiment %d", uid, ticket.experiment_id)
        ticket.recipe = {**ticket.recipe, "sample": uid}

    def characterize(self, ticket: Ticket) -> float:
        """Measure the sample on a free station; returns the objective's ``ok`` value.

        A value the station flags (drift) is kept as a flagged measurement and the sample is
        measured again, up to ``max_measure_attempts`` times.

        Raises:
            MaterialFailure: The station's phase identification says the target did not form.
            InstrumentError: An instrument fault, or no ``ok`` value after every attempt.
            InstrumentOutage: The station stayed unreachable for its outage window.
            Interrupted: The run is aborting.
        """
        from devices.plans import characterize
        from sdl.lab.phases import phase_failure

        # A retry (or a resumed experiment) may find its value stored already; a first try cannot.
        value = None if ticket.first_try("characterization") else self.measured_value(ticket.experiment_id)
        if value is not None:
            ticket.stage = "record"
            return value
        attempt = 1
        while attempt <= self.max_measure_attempts:
            self._check_interrupt("characterization")
            measure_job = f"{ticket.job_id}.m{attempt}"[-128:]
            recipe = {**ticket.recipe, "measure_job_id": measure_job}
            station = self._measure_jobs.get(measure_job)
            if station is None and ticket.key in self._recovered:
                station = self._station_knowing(measure_job)
            with self.pool.lease(STATION, station) as (name, device):
                self._measure_jobs[measure_job] = name
                phases = self.phase_detectors.get(name)
                outcome = self._run_on(name, device, ticket, measure_job,
                                       characterize(device, recipe, md=self._md(ticket),  # type: ignore[arg-type]
                                                    phases=phases))
            if self.writer.pending:
                self.writer.retry()
            if not outcome.ok:
                error = _as_lab_error(outcome.exception, name)
                if self._held(name, error):
                    continue  # the same measurement job again, on the same station
                if self.interrupted == "abort":
                    raise Interrupted(f"characterization aborted: {error}", aborted=True) from error
                raise error
            if phases is not None:
                reason = phase_failure(self.store, ticket.experiment_id, outcome.run_uids, phases.key("summary"))
                if reason is not None:
                    raise MaterialFailure(reason, instrument=name)
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
            attempt += 1
        raise InstrumentError(
            f"no usable {self.property} measurement after {self.max_measure_attempts} attempts",
            instrument=STATION,
        )

    def _station_knowing(self, measure_job: str) -> str | None:
        """The station that already has ``measure_job`` (after a crash or a retry), if any."""
        for name in self.pool.names(STATION):
            try:
                if self.pool.devices[name].job(measure_job).get("state") != "unknown":
                    return name
            except InstrumentError:
                continue
        return None

    def measured_value(self, experiment_id: int) -> float | None:
        """Mean of the experiment's ``ok`` measurements of the objective, or None."""
        values = [m.value for m in self.store.measurements(experiment_id=experiment_id)
                  if m.property == self.property and m.quality == "ok"]
        return sum(values) / len(values) if values else None

    def other_values(self, experiment_id: int) -> dict[str, float]:
        """Mean ``ok`` measurement of each other modelled property (several objectives, constraints)."""
        if len(self.properties) == 1:
            return {}
        found: dict[str, list[float]] = {}
        for m in self.store.measurements(experiment_id=experiment_id):
            if m.property in self.properties[1:] and m.quality == "ok":
                found.setdefault(m.property, []).append(m.value)
        return {p: sum(v) / len(v) for p, v in found.items()}

    def _pareto_progress(self) -> Callable[[int, float], bool] | None:
        """Several objectives: ``patience`` counts experiments since the measured front grew."""
        if self.cfg.objectives is None:
            return None
        from sdl.engine.pareto import MultiObjective
        from sdl.lab.pareto import progress_for

        return progress_for(MultiObjective.from_campaign(self.cfg), self.store)

    def complete(self, ticket: Ticket, value: float) -> Outcome:
        """running → completed; the engine learns the value."""
        from sdl.engine import Observation

        self.store.complete_experiment(ticket.experiment_id)
        with self._engine_lock:
            self.engine.observe([Observation(key=ticket.candidate_key, params=ticket.params, value=value,
                                             values=self.other_values(ticket.experiment_id))])
        self.ledger.ended(ticket.experiment_id, "completed", from_state="running",
                          candidate_key=ticket.candidate_key, value=value)
        self._tickets.pop(ticket.experiment_id, None)
        self.notify()
        return Outcome(ticket, "completed", value)

    def _learn_failures(self, keys: list[str]) -> None:
        """Material failures teach the engine's feasibility model (pool campaigns; a space has none yet)."""
        if not keys or self.engine.pool is None:
            return
        with self._engine_lock:
            self.engine.observe_failures([k for k in keys if k in self.engine.pool])

    def _fail(self, ticket: Ticket, reason: str) -> Outcome:
        self.store.fail_experiment(ticket.experiment_id, reason=reason, kind="material")
        self._learn_failures([ticket.candidate_key])
        self.ledger.ended(ticket.experiment_id, "failed", from_state="running", candidate_key=ticket.candidate_key)
        self._tickets.pop(ticket.experiment_id, None)
        self.notify()
        return Outcome(ticket, "failed", reason=reason)

    def fail(self, ticket: Ticket, error: MaterialFailure) -> Outcome:
        """running → failed (material): recorded, never retried."""
        return self._fail(ticket, str(error))

    def _abandon(self, ticket: Ticket, reason: str) -> Outcome:
        record = self.store.get_experiment(ticket.experiment_id)
        assert record is not None
        self.store.abandon_experiment(ticket.experiment_id, reason=reason)
        self.ledger.ended(ticket.experiment_id, "abandoned", from_state=record.state,
                          candidate_key=ticket.candidate_key)
        self._tickets.pop(ticket.experiment_id, None)
        self.notify()
        return Outcome(ticket, "abandoned", reason=reason)

    def abandon(self, ticket: Ticket, error: BaseException) -> Outcome:
        """End an experiment an instrument could not finish (after retries): abandoned, never repeated.

        The robot is asked to abort the job first, so that it does not stay busy with it.
        """
        if ticket.robot is not None and ticket.stage == "synthesis":
            with contextlib.suppress(Exception):
                self.pool.devices[ticket.robot].abort(ticket.job_id)
        return self._abandon(ticket, f"{type(error).__name__}: {error}")

    def hold(self, ticket: Ticket, reason: str) -> Outcome:
        """Leave an experiment in its state for the next run (an outage or an interrupt)."""
        record = self.store.get_experiment(ticket.experiment_id)
        state = record.state if record is not None else "proposed"
        self.ledger.released(ticket.experiment_id)
        self._tickets.pop(ticket.experiment_id, None)
        self.event("experiment.held", f"experiment {ticket.experiment_id} stays {state}: {reason}",
                   experiment_id=ticket.experiment_id, level="warning", payload={"state": state})
        self.notify()
        return Outcome(ticket, state, reason=reason)

    # ------------------------------------------------------------------ monitoring
    def model_metrics(self) -> dict[str, Any]:
        """Prospective accuracy of the models: each completed proposal's prediction vs its measurement.

        Honest by construction: the prediction was made before the measurement existed.
        """
        from sdl.engine.uq import uncertainty_metrics

        y, mu, sd = self._predictions()
        if len(y) < 2:
            return {"n": len(y)}
        try:
            return uncertainty_metrics(y, mu, sd)
        except ValueError as exc:
            return {"n": len(y), "error": str(exc)}

    def _predictions(self) -> tuple[list[float], list[float], list[float]]:
        ids = dict(self.ledger.values())
        y, mu, sd = [], [], []
        for exp in self.store.experiments(self.campaign_id, states=("completed",)):
            if exp.id in ids and exp.predicted_mean is not None and exp.predicted_std is not None:
                y.append(ids[exp.id])
                mu.append(exp.predicted_mean)
                sd.append(max(exp.predicted_std, 0.0))
        return y, mu, sd

    def round_due(self) -> bool:
        """True when ``retrain.every`` new measurements arrived since the last report."""
        return len(self.ledger.values()) - self._reported >= int(self.cfg.retrain.every)

    def round_report(self, true_best: float | None = None) -> RoundReport:
        """Best so far, model metrics, the latest proposals' provenance, and the plots."""
        from sdl.report import RoundData, draw_round_plots

        pairs = self.ledger.values()
        self._reported = len(pairs)
        self._round += 1
        values = [v for _, v in pairs]
        done = self.n_ended
        best = self.best()
        metrics = self.model_metrics()
        experiments = self.store.experiments(self.campaign_id)
        measured = dict(pairs)
        key_of = {e.id: e.candidate_key for e in experiments}
        paths = draw_round_plots(self.cfg, self.objective.goal, RoundData(
            [key_of.get(i, "") for i, _ in pairs], values, *self._predictions()), self.state_dir / "plots")
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

    def finish(self) -> str:
        """Record how the campaign ended; returns the state (completed, stopped, failed or cancelled).

        Budget reached: ``completed``; a failure (instrument gone, failure budget spent): ``failed``;
        any other rule or an interrupt: ``stopped`` (the next ``sdl run`` resumes it).
        """
        self.sync_hands()
        if self.ledger.failure is not None:
            state, reason = "failed", self.ledger.failure
        else:
            hands = self.ledger.by_hand()
            if hands:  # the rest of the budget is in a person's hands: say so, in the summary too
                self.ledger.stop(f"{len(hands)} experiment(s) asked by hand wait for `sdl tell` "
                                 f"({', '.join(str(e.experiment_id) for e in hands)})")
            reason = self.ledger.stop_reason or "nothing left to do"
            state = "completed" if reason.startswith("budget") and self.interrupted is None else "stopped"
        self.store.set_campaign_state(self.campaign_id, state, reason=reason)
        if self.control is not None:
            self.control.finished()
            if self.control.cancelled_by is not None:
                state = "cancelled"
        self.alerts.ended(state, reason)
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
        """Close the instruments' lines and the phase identification workers; deliver the last alerts."""
        for device in [*self.pool.devices.values(), *self.phase_detectors.values()]:
            with contextlib.suppress(Exception):
                device.close()
        self.alerts.close()


def _as_lab_error(exc: BaseException | None, instrument: str) -> BaseException:
    """Material failures stay; instrument errors stay; anything else is an instrument fault."""
    if isinstance(exc, MaterialFailure | InstrumentError):
        return exc
    return InstrumentError(f"plan failed: {type(exc).__name__}: {exc}", instrument=instrument)


@contextlib.contextmanager
def open_lab(
    cfg: CampaignConfig,
    database_url: str,
    *,
    budget: int | None = None,
    seed: int | None = None,
    time_scale: float | None = None,
    state_dir: Path | None = None,
    amend: bool = False,
    holder: str = "sdl run",
) -> Iterator[Lab]:
    """Open the repository, take the campaign's lease, start simulators, connect the instruments.

    Everything is closed (the lease released, the simulators stopped) when the block ends, even on
    error. A second runner of the same campaign is refused at once (``CampaignLocked``).

    Args:
        cfg: The loaded campaign.
        database_url: Repository URL (migrated to head on open).
        budget: Overrides ``cfg.budget.experiments``.
        seed: Overrides ``cfg.seed`` (engine and simulators).
        time_scale: Overrides every simulator's time scale.
        state_dir: Journals and plots (default: :func:`state_dir_for` the database / campaign).
        amend: Accept a changed YAML for an existing campaign (recorded as an event).
        holder: Who holds the lease (shown to a second runner).
    """
    from sdl.engine import Engine
    from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path
    from sdl.lab.simulation import SimulatorFleet
    from sdl.repository import Store, hold_lease

    if seed is not None and seed != cfg.seed:
        cfg = cfg.model_copy(update={"seed": int(seed)})
    if not cfg.instruments:
        raise SDLError(f"campaign {cfg.name!r} lists no instruments: it can be validated and benchmarked, not run")
    drivers = {inst.name: load_driver(inst.driver, inst.role) for inst in cfg.instruments}  # bad names fail first
    tables = _phase_tables(cfg)  # so do bad phase tables: nothing is written yet
    state_dir = Path(state_dir) if state_dir else state_dir_for(database_url) / cfg.name
    state_dir.mkdir(parents=True, exist_ok=True)
    step("opening the repository %s", re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", database_url))
    store = Store.from_url(database_url, create=True)
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        stack.enter_context(_gil_handoffs())
        step("building the %s engine over the search space", cfg.model.name)
        embeddings = EmbeddingStore(default_store_path(database_url))
        if cfg.fidelities is not None:  # cheap computed sources beside the experiments
            from sdl.engine.multifidelity import MultiFidelityEngine

            engine = MultiFidelityEngine.from_campaign(cfg, embedding_store=embeddings)
        else:
            engine = Engine.from_campaign(cfg, embedding_store=embeddings)
        lab = Lab(cfg, store, engine, InstrumentPool({}), budget=budget, seed=cfg.seed, state_dir=state_dir,
                  amend=amend)
        existing = store.get_campaign(cfg.name)
        if existing is not None:  # the lease first: a second runner must not touch a running campaign
            stack.enter_context(hold_lease(store, existing.id, holder=holder, on_lost=lab.lease_lost))
        lab.start()  # refuses a changed YAML before anything is started
        if existing is None:
            stack.enter_context(hold_lease(store, lab.campaign_id, holder=holder, on_lost=lab.lease_lost))
        fleet = stack.enter_context(SimulatorFleet(state_dir, cfg.name, time_scale=time_scale))
        step("starting %d simulated instrument(s)", sum(1 for i in cfg.instruments if i.simulated))
        urls = fleet.start(cfg.instruments, seed=cfg.seed)
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            import torch

            torch.set_num_threads(threads)
        engine.prepare(progress=_featurize_logger(cfg.name))
        step("connecting to %d instrument(s)", len(cfg.instruments))
        devices: dict[str, tuple[str, InstrumentPort]] = {}
        stack.callback(lab.close)
        for inst in cfg.instruments:
            url = urls.get(inst.name) or inst.url
            common: dict[str, Any] = dict(name=inst.name, url=url, line_timeout=inst.timeout_s,
                                          on_fault=lab.fault_callback(inst.name), **inst.options)
            if inst.role == STATION:
                common["properties"] = list(inst.measures)
                if inst.phase_identification is not None and inst.phase_identification.enabled:
                    common["raw"] = True  # the phase identification reads the streamed pattern
            devices[inst.name] = (inst.role, drivers[inst.name](**common))
        lab.pool = InstrumentPool(devices, on_release=lab.notify, guard=lab.guard)
        for name in devices:  # the first experiment must not pay for the RunEngines' first use
            warm_up(name)
        if any(i.phase_identification is not None and i.phase_identification.enabled for i in cfg.instruments):
            lab.phase_detectors = _phase_detectors(cfg, engine, devices, tables)
        try:
            lab.check_instruments()
        except SDLError as exc:  # dead at start: the campaign fails before it spends anything
            lab.ledger.fail(str(exc))
            lab.finish()
            raise
        try:
            yield lab
        except Exception as exc:
            lab.alerts.crashed(exc)
            raise


GIL_SWITCH_INTERVAL_S = 0.0005
"""The interpreter's thread switch interval while a lab is open (Python's default: 5 ms)."""


@contextlib.contextmanager
def _gil_handoffs() -> Iterator[None]:
    """A shorter thread switch interval while the lab runs (the previous one restored after).

    Why: one experiment hands work from thread to thread a dozen times (loop → RunEngine →
    device worker → status callback → writer, and Prefect's task engine and its event and log
    workers). A thread woken by I/O waits for the GIL until the running thread gives it up, up
    to the whole switch interval; measured on a loaded 2-core machine that cost more than the
    work itself (a Prefect no-op task run: 7.0 ms at 5 ms, 3.5 ms at 0.2 ms). Lab threads mostly
    wait on I/O, so the extra switches cost CPU-bound work (a model fit) little.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, GIL_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _phase_tables(cfg: CampaignConfig) -> dict[str, PhaseTable]:
    """The campaign's phase tables, loaded (and so checked) before anything is written."""
    from sdl.lab.phases import load_phase_tables
    from sdl.xrd import PhaseTableError

    try:
        return load_phase_tables(cfg)
    except PhaseTableError as exc:  # names the file (and row or column)
        raise SDLError(str(exc)) from exc


def _phase_detectors(cfg: CampaignConfig, engine: Engine, devices: dict[str, tuple[str, InstrumentPort]],
                     tables: dict[str, PhaseTable]) -> dict[str, XRDPhaseDetector]:
    """The XRD phase detectors of the stations that ask for one (targets from the engine's pool)."""
    from devices.station import CharacterizationStation
    from sdl.lab.phases import phase_detectors

    pool = engine.pool
    if pool is None or pool.structure_column is None:
        raise SDLError("phase_identification needs a crystal candidate pool (search_space.candidates)")
    stations = {name: dev for name, (role, dev) in devices.items()
                if role == STATION and isinstance(dev, CharacterizationStation)}
    missing = [i.name for i in cfg.instruments
               if i.phase_identification is not None and i.phase_identification.enabled and i.name not in stations]
    if missing:
        raise SDLError(f"phase_identification on {missing}: only the sdl-line CharacterizationStation streams "
                       "the XRD pattern it needs")

    def structure_of(key: str) -> Structure:  # the engine's pool now: it may have grown (search_space.generate)
        current = engine.pool or pool
        return current.structures([current.index_of(key)])[0]

    return phase_detectors(cfg, stations, structure_of, tables)


def _featurize_logger(campaign: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that logs featurising progress about every 10 %."""
    last = [-1]

    def report(done: int, total: int) -> None:
        tenth = int(10 * done / max(1, total))
        if tenth != last[0]:
            last[0] = tenth
            step("campaign %s: featurising candidates %d / %d", campaign, done, total, update=done > 0)

    return report
