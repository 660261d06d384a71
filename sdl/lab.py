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
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdl.exceptions import InstrumentError, MaterialFailure, SDLError

__all__ = [
    "ROBOT",
    "STATION",
    "Ticket",
    "Outcome",
    "RoundReport",
    "InstrumentPool",
    "Lab",
    "job_id_for",
    "state_dir_for",
    "open_lab",
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


def state_dir_for(database_url: str) -> Path:
    """Directory next to the database for journals, plots, Prefect home (``.sdl`` beside a SQLite file).

    For a server database (PostgreSQL) it is ``./.sdl`` in the working directory.
    """
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().resolve().parent / ".sdl"
    return Path.cwd() / ".sdl"


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
    robot, and the flow asks :meth:`free` to decide when to propose the next experiment.

    Args:
        instruments: ``{name: (role, device)}``.
        on_release: Called (no arguments) whenever an instrument is given back.
    """

    def __init__(
        self, instruments: dict[str, tuple[str, Any]], on_release: Callable[[], None] | None = None
    ) -> None:
        self.devices: dict[str, Any] = {name: dev for name, (_, dev) in instruments.items()}
        self.roles: dict[str, str] = {name: role for name, (role, _) in instruments.items()}
        self._free: dict[str, queue.Queue[str]] = {}
        for name, role in self.roles.items():
            self._free.setdefault(role, queue.Queue()).put(name)
        self._on_release = on_release

    def count(self, role: str) -> int:
        """Number of instruments with ``role``."""
        return sum(1 for r in self.roles.values() if r == role)

    def names(self, role: str) -> list[str]:
        """Names of the instruments with ``role``."""
        return [n for n, r in self.roles.items() if r == role]

    def free(self, role: str) -> int:
        """Number of instruments of ``role`` free right now."""
        q = self._free.get(role)
        return 0 if q is None else q.qsize()

    @contextlib.contextmanager
    def lease(self, role: str, prefer: str | None = None) -> Iterator[tuple[str, Any]]:
        """Borrow a free instrument of ``role`` (blocks until one frees); yields ``(name, device)``."""
        q = self._free.get(role)
        if q is None:
            raise SDLError(f"the campaign has no instrument with role {role!r}")
        name = q.get()
        if prefer is not None and name != prefer and prefer in self.roles:
            # A reconciled experiment must go back to the robot that knows its job.
            q.put(name)
            name = self._take(q, prefer)
        try:
            yield name, self.devices[name]
        finally:
            q.put(name)
            if self._on_release is not None:
                self._on_release()

    @staticmethod
    def _take(q: queue.Queue[str], wanted: str) -> str:
        while True:
            name = q.get()
            if name == wanted:
                return name
            q.put(name)
            time.sleep(0.01)


class Lab:
    """One campaign's laboratory: repository, engine, instruments and the rules that tie them.

    Build it with :func:`open_lab` (which also starts simulators and connects devices). Every
    public method is safe to call from worker threads; engine calls are serialized by a lock.

    Args:
        cfg: The loaded campaign.
        store: The repository (``sdl.repository.Store``), already upgraded.
        engine: ``sdl.engine.Engine`` for this campaign.
        pool: Connected instruments.
        runner: Runs Bluesky plans (``sdl.runner``); one per process.
        budget: Experiments to reach an end state (overrides ``cfg.budget.experiments``).
        state_dir: Where plots go.
        time_scale: Scale of waiting times (polling while an instrument finishes a job).
    """

    def __init__(
        self,
        cfg: Any,
        store: Any,
        engine: Any,
        pool: InstrumentPool,
        runner: Any,
        *,
        budget: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.engine = engine
        self.pool = pool
        self.runner = runner
        self.budget = int(budget if budget is not None else cfg.budget.experiments)
        self.state_dir = Path(state_dir) if state_dir else Path.cwd() / ".sdl"
        self.property = cfg.objective.property
        self.goal = cfg.objective.goal
        self._engine_lock = threading.Lock()
        self._changed = threading.Condition()
        self._inflight: dict[int, Ticket] = {}
        self._unobserved: list[tuple[str, dict[str, Any], float]] = []
        self._observed_keys: set[str] = set()
        self._round = 0
        self._since_improvement = 0
        self._best: float | None = None
        self._last_acquisition: list[float] = []
        self.campaign_id: int = 0
        self._campaign_token = ""

    # ------------------------------------------------------------------ campaign and engine
    def start(self) -> None:
        """Get or create the campaign row and teach the engine everything already measured."""
        raise NotImplementedError  # filled in below once the Store API is known

    # ------------------------------------------------------------------ waiting
    def notify(self) -> None:
        """Wake the flow's loop (an instrument freed or an experiment ended)."""
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until :meth:`notify` or ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)
