"""The experiment ledger: one campaign's counts, experiments in flight, exclusions and stopping rules.

Why one object (Ax's ``Experiment`` owns its trials' state): every question the loop asks — how
many experiments to propose now, which keys are pending, which are excluded, is the budget spent,
did a rule fire, did the campaign fail — is answered here from one consistent state under one lock,
never from a second copy. The repository stays the source of truth across processes; the ledger is
rebuilt from it on start (:meth:`ExperimentLedger.load`) and then moved by the same transitions the
repository commits.

Batches. In ``batch`` mode (the default) the loop proposes ``batch_size`` experiments as one
q-batch once every experiment of the previous batch has ended; in ``asynchronous`` mode it proposes
one experiment whenever a robot is free. Either way only *proposed* and *running* experiments are
pending points; failed and abandoned ones are *excluded* (never proposed again) but are not pending.

Budget. An experiment counts once it reached an end state (completed, failed or abandoned); no
experiment is proposed beyond ``budget - ended - in flight``, so a campaign ends with exactly
``budget`` experiments in end states unless a rule stops it early.

Hands. Experiments asked by a person (``sdl ask``, :mod:`sdl.lab.manual`) are in flight too: they
are pending points and count against the budget, but no instrument runs them, so they never hold
back a batch of the instruments and the loop does not wait for them (their results arrive by
``sdl tell``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from sdl.engine.objectives import Objective

__all__ = [
    "END_STATES",
    "HANDS",
    "STATES",
    "BatchMode",
    "ExperimentLedger",
    "LedgerEntry",
    "StoppingPolicy",
    "asked_by_hand",
]

logger = logging.getLogger(__name__)

END_STATES = ("completed", "failed", "abandoned")
STATES = ("proposed", "running", *END_STATES)
BatchMode = Literal["batch", "asynchronous"]
HANDS = "hands"
"""``provenance_extra["source"]`` of an experiment asked by a person: instruments never run it."""


def asked_by_hand(provenance_extra: Mapping[str, object] | None) -> bool:
    """Whether an experiment's provenance says a person, not an instrument, carries it out."""
    return provenance_extra is not None and provenance_extra.get("source") == HANDS


@dataclass(frozen=True)
class StoppingPolicy:
    """The campaign's limits and early stops (from the YAML's ``budget`` and ``stopping``).

    Attributes:
        budget: Experiments to reach an end state.
        batch_size: Experiments per q-batch (also the size of a "round" for ``patience``).
        mode: ``batch`` or ``asynchronous`` proposing.
        goal_value: Stop once a measured value reaches it (:meth:`Objective.reached`).
        patience: Stop after this many rounds without improvement.
        max_failures: Fail after more failed experiments than this (abandoned ones too unless
            ``max_abandoned`` is set).
        max_abandoned: Fail after more abandoned experiments than this.
    """

    budget: int
    batch_size: int = 1
    mode: BatchMode = "batch"
    goal_value: float | None = None
    patience: int | None = None
    max_failures: int | None = None
    max_abandoned: int | None = None


@dataclass
class LedgerEntry:
    """What the ledger knows of one experiment in flight."""

    experiment_id: int
    candidate_key: str
    state: str
    batch_id: str | None = None
    by_hand: bool = False


@dataclass
class _Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    values: list[tuple[int, float]] = field(default_factory=list)
    best_value: float | None = None
    best: tuple[int, str] | None = None  # (experiment id, candidate key) of best_value
    since_improvement: int = 0


class ExperimentLedger:
    """Counts, in-flight experiments, exclusions and the stopping rules of one campaign (thread-safe).

    Args:
        objective: The campaign's objective (what "better" and "goal reached" mean).
        policy: Budget, batching and stopping rules.
    """

    def __init__(self, objective: Objective, policy: StoppingPolicy,
                 improvement: Callable[[int, float], bool] | None = None) -> None:
        self.objective = objective
        self.policy = policy
        self.improvement = improvement  # (experiment id, value) -> progress? (several objectives: the front grew)
        self._lock = threading.RLock()
        self._tally = _Tally()
        self._inflight: dict[int, LedgerEntry] = {}
        self._excluded: set[str] = set()
        self.stop_reason: str | None = None
        self.failure: str | None = None

    # ------------------------------------------------------------------ loading
    def load(self, states: Iterable[tuple[int, str, str]], values: Iterable[tuple[int, float]]) -> None:
        """Rebuild from the repository: ``(experiment id, candidate key, state)`` and measured values.

        In-flight experiments are *not* entered here: :meth:`track` enters each one the loop resumes.
        """
        with self._lock:
            keys = {}
            for experiment_id, key, state in states:
                keys[experiment_id] = key
                self._tally.counts[state] += 1
                if state in ("failed", "abandoned"):
                    self._excluded.add(key)
            for experiment_id, value in values:
                self._record_value(experiment_id, value, keys.get(experiment_id, ""))

    # ------------------------------------------------------------------ transitions
    def track(self, experiment_id: int, candidate_key: str, state: str, batch_id: str | None = None,
              *, new: bool = False, by_hand: bool = False) -> None:
        """Enter an experiment in flight (``new``: just proposed, so it is counted as proposed now;
        ``by_hand``: a person carries it out, see the module docstring)."""
        with self._lock:
            if new:
                self._tally.counts[state] += 1
            self._inflight[experiment_id] = LedgerEntry(experiment_id, candidate_key, state, batch_id, by_hand)

    def started(self, experiment_id: int) -> None:
        """proposed → running."""
        with self._lock:
            entry = self._inflight.get(experiment_id)
            if entry is None or entry.state != "proposed":
                return
            entry.state = "running"
            self._tally.counts["proposed"] -= 1
            self._tally.counts["running"] += 1

    def ended(self, experiment_id: int, state: str, *, from_state: str, candidate_key: str,
              value: float | None = None) -> None:
        """``from_state`` → an end state; checks the rules."""
        if state not in END_STATES:
            raise ValueError(f"{state=} is not an end state {END_STATES}")
        with self._lock:
            self._inflight.pop(experiment_id, None)
            self._tally.counts[from_state] -= 1
            self._tally.counts[state] += 1
            if state == "completed":
                if value is None:
                    raise ValueError("a completed experiment needs its value")
                self._record_value(experiment_id, value, candidate_key)
            else:
                self._excluded.add(candidate_key)
            self.check_rules()

    def exclude(self, candidate_key: str) -> None:
        """Never propose ``candidate_key`` again (a person dropped it at approval)."""
        with self._lock:
            self._excluded.add(candidate_key)

    def released(self, experiment_id: int) -> None:
        """Forget an experiment in flight that stays in its state for the next run (an interrupt)."""
        with self._lock:
            self._inflight.pop(experiment_id, None)

    # ------------------------------------------------------------------ questions
    @property
    def n_ended(self) -> int:
        """Experiments in an end state (what the budget counts)."""
        with self._lock:
            return sum(self._tally.counts[s] for s in END_STATES)

    @property
    def n_total(self) -> int:
        """Every experiment of the campaign, in any state."""
        with self._lock:
            return sum(self._tally.counts.values())

    def counts(self) -> dict[str, int]:
        """Experiments per state."""
        with self._lock:
            return dict(self._tally.counts)

    def values(self) -> list[tuple[int, float]]:
        """``(experiment id, value)`` of the completed experiments, in completion order."""
        with self._lock:
            return list(self._tally.values)

    def pending_keys(self) -> list[str]:
        """Candidate keys of the experiments proposed or running (the acquisition's pending points)."""
        with self._lock:
            return [e.candidate_key for e in self._inflight.values()]

    def excluded_keys(self) -> list[str]:
        """Candidate keys that failed or were abandoned: never proposed again, not pending."""
        with self._lock:
            return sorted(self._excluded)

    def inflight(self) -> list[LedgerEntry]:
        """The experiments in flight."""
        with self._lock:
            return list(self._inflight.values())

    @property
    def best_value(self) -> float | None:
        """The best measured value so far (by :meth:`Objective.is_better`)."""
        with self._lock:
            return self._tally.best_value

    def best(self) -> tuple[int, str, float] | None:
        """``(experiment id, candidate key, value)`` of :attr:`best_value`, the first to reach it.

        What the loop has seen (no query): for progress displays. The repository's own view, which
        also sees measurements changed since (``sdl tell``, invalidations), is ``Lab.best()``.
        """
        with self._lock:
            tally = self._tally
            return None if tally.best is None or tally.best_value is None else (*tally.best, tally.best_value)

    def wanted(self, free_robots: int) -> int:
        """How many experiments to propose now.

        ``batch``: a full batch (within the budget) once nothing of the previous batch is in flight,
        else 0. ``asynchronous``: one per free robot that no proposed experiment is waiting for.
        """
        with self._lock:
            if self.stop_reason is None and self.n_ended >= self.policy.budget:
                self.stop_reason = f"budget of {self.policy.budget} experiments reached"
            if self.stop_reason is not None or self.failure is not None:
                return 0
            remaining = self.policy.budget - self.n_ended - len(self._inflight)
            on_instruments = [e for e in self._inflight.values() if not e.by_hand]
            if self.policy.mode == "batch":
                return 0 if on_instruments else max(0, min(remaining, self.policy.batch_size))
            waiting = sum(1 for e in on_instruments if e.state == "proposed")
            return max(0, min(remaining, free_robots - waiting))

    def remaining(self) -> int:
        """Experiments the budget still allows beyond those ended and in flight (0 once a rule fired)."""
        with self._lock:
            if self.stop_reason is not None or self.failure is not None:
                return 0
            return max(0, self.policy.budget - self.n_ended - len(self._inflight))

    def by_hand(self) -> list[LedgerEntry]:
        """The experiments in flight that a person carries out (waiting for ``sdl tell``)."""
        with self._lock:
            return [e for e in self._inflight.values() if e.by_hand]

    def done(self) -> bool:
        """True when no instrument has work in flight and nothing more will be proposed."""
        with self._lock:
            busy = any(not e.by_hand for e in self._inflight.values())
            return not busy and (self.stop_reason is not None or self.failure is not None
                                 or self.n_ended >= self.policy.budget)

    # ------------------------------------------------------------------ rules
    def stop(self, reason: str) -> None:
        """Stop proposing (first reason wins)."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                logger.info("stopping: %s", reason)

    def fail(self, reason: str) -> None:
        """The campaign cannot go on (an instrument is gone, the failure budget is spent)."""
        with self._lock:
            if self.failure is None:
                self.failure = reason
                logger.warning("campaign failing: %s", reason)

    def check_rules(self) -> None:
        """Set :attr:`stop_reason` or :attr:`failure` when a rule fires (after every end state)."""
        policy, counts = self.policy, self._tally.counts
        with self._lock:
            if policy.max_abandoned is not None:
                failed, abandoned = counts["failed"], counts["abandoned"]
                if abandoned > policy.max_abandoned:
                    self.fail(f"{abandoned} experiments abandoned to instrument faults (max_abandoned "
                              f"{policy.max_abandoned})")
            else:
                failed, abandoned = counts["failed"] + counts["abandoned"], 0
            if policy.max_failures is not None and failed > policy.max_failures:
                what = "failed" if policy.max_abandoned is not None else "failed or abandoned"
                self.fail(f"{failed} experiments {what} (max_failures {policy.max_failures})")
            if self.stop_reason is not None:
                return
            best = self._tally.best_value
            if self.n_ended >= policy.budget:
                self.stop(f"budget of {policy.budget} experiments reached")
            elif policy.goal_value is not None and self.objective.reached(best, policy.goal_value):
                self.stop(f"goal value {policy.goal_value} reached")
            elif policy.patience is not None and self._tally.values:
                per_round = max(1, policy.batch_size)
                if self._tally.since_improvement >= policy.patience * per_round:
                    self.stop(f"no improvement in {policy.patience} rounds "
                              f"({self._tally.since_improvement} experiments)")

    def _record_value(self, experiment_id: int, value: float, candidate_key: str) -> None:
        tally = self._tally
        tally.values.append((experiment_id, value))
        better = self.objective.is_better(value, tally.best_value)
        if better:
            tally.best_value = value
            tally.best = (experiment_id, candidate_key)
        if better if self.improvement is None else self.improvement(experiment_id, value):
            tally.since_improvement = 0
        else:
            tally.since_improvement += 1

