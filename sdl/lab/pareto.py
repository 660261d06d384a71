"""A campaign with several objectives in the lab: what was measured per property, and what counts as progress.

Why "progress" is a new point on the front: with several objectives there is no single best value,
so ``stopping.patience`` counts experiments since the measured Pareto front last grew (a feasible
measurement that no earlier one weakly dominates). That is exactly when the hypervolume grows for
every reference point the new point dominates, so the rule does not depend on an inferred reference
point that moves as data arrive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdl.engine.pareto import MultiObjective

if TYPE_CHECKING:
    from sdl.repository import Store

__all__ = ["MeasuredTable", "ParetoProgress", "front_summary", "measured_table", "progress_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredTable:
    """Completed experiments and their values of every modelled property.

    Attributes:
        experiment_ids: Experiment id per row (in experiment order).
        keys: Candidate key per row.
        Y: ``n x p`` mean ``ok`` measurement per property (NaN: not measured).
    """

    experiment_ids: list[int]
    keys: list[str]
    Y: np.ndarray


def measured_table(store: Store, campaign_id: int, properties: Sequence[str]) -> MeasuredTable:
    """Every completed experiment with a value of the first property, and its other properties."""
    first = store.observations(campaign_id, properties[0])
    others = [{o.experiment_id: o.value for o in store.observations(campaign_id, p)} for p in properties[1:]]
    Y = np.asarray([[o.value] + [other.get(o.experiment_id, math.nan) for other in others] for o in first],
                   dtype=np.float64).reshape(-1, len(properties))
    return MeasuredTable([o.experiment_id for o in first], [o.candidate_key for o in first], Y)


def front_summary(store: Store, campaign_id: int, objectives: MultiObjective) -> dict[str, object]:
    """The measured front (rows of property values) and its hypervolume: ``sdl run``'s and ``sdl status``'s."""
    table = measured_table(store, campaign_id, objectives.properties)
    if not table.keys:
        return {"pareto_front": [], "hypervolume": 0.0}
    front = objectives.front(table.Y)
    try:
        volume = objectives.hypervolume(table.Y, objectives.reference_utility(table.Y))
    except ValueError:
        volume = 0.0
    rows = [{"candidate": table.keys[i], "experiment": table.experiment_ids[i],
             **{p: float(table.Y[i, j]) for j, p in enumerate(objectives.properties)}}
            for i in np.flatnonzero(front)]
    return {"pareto_front": rows, "hypervolume": volume}


class ParetoProgress:
    """``(experiment id, value) -> improved?`` for :class:`sdl.lab.ledger.ExperimentLedger`.

    Args:
        objectives: The campaign's objectives and constraints.
        values_of: Experiment id -> its raw values over ``objectives.properties``.
    """

    def __init__(self, objectives: MultiObjective, values_of: Callable[[int], Sequence[float]]) -> None:
        self.objectives = objectives
        self.values_of = values_of
        self.front = np.zeros((0, len(objectives.properties)))

    def __call__(self, experiment_id: int, value: float) -> bool:
        """Add the experiment; True when its (feasible) values joined the front."""
        row = np.asarray(self.values_of(experiment_id), dtype=np.float64).reshape(1, -1)
        if not self.objectives.feasible(row)[0]:
            return False
        if self.front.shape[0]:
            front, new = self.objectives.utilities(self.front), self.objectives.utilities(row)[0]
            if np.any(np.all(front - new >= 0, axis=1)):
                return False  # weakly dominated: the front (and every hypervolume) stays the same
        merged = np.vstack([self.front, row])
        self.front = merged[self.objectives.front(merged)]
        return True


class _ValuesOf:
    """Reads an experiment's values of every property from the repository."""

    def __init__(self, store: Store, properties: Sequence[str]) -> None:
        self.store = store
        self.properties = list(properties)

    def __call__(self, experiment_id: int) -> list[float]:
        found: dict[str, list[float]] = {}
        for m in self.store.measurements(experiment_id=experiment_id):
            if m.quality == "ok" and m.property in self.properties and m.value is not None:
                found.setdefault(m.property, []).append(float(m.value))
        return [sum(found[p]) / len(found[p]) if p in found else math.nan for p in self.properties]


def progress_for(objectives: MultiObjective, store: Store) -> ParetoProgress:
    """The progress rule of a campaign whose values live in ``store``."""
    return ParetoProgress(objectives, _ValuesOf(store, objectives.properties))
