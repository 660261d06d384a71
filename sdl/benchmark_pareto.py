"""Pool replay with several objectives: the other properties' truth, the true front, hypervolume curves.

What is measured: after each experiment, the hypervolume of the feasible measured candidates
(their recorded values) divided by the hypervolume of the pool's whole feasible Pareto front, both
above the same reference point (the YAML's ``reference_point``, else the one BoTorch infers from the
pool's front). So 1.0 means every point of the true front was measured, and curves of different
strategies and seeds are comparable. The "top set" behind ``recall`` becomes the pool's true Pareto
front, so recall still means "share of the best designs found"; ``best_so_far`` stays the first
objective's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sdl.engine.pareto import MultiObjective

__all__ = ["attach_objectives", "hypervolume_curves", "hypervolume_summary", "pool_front"]

logger = logging.getLogger(__name__)


def attach_objectives(dataset: Any, cfg: Any, file: str | Path) -> None:
    """Give a benchmark dataset the other modelled properties of a campaign (aligned by id).

    Raises:
        BenchmarkError: A property that is no column of the file.
    """
    from sdl.benchmark import BenchmarkError

    if dataset.mode != "crystal":
        raise BenchmarkError(f"{file}: a benchmark with several objectives replays a crystal pool (one row per "
                             "candidate); table pools with replicates are not supported yet")
    objectives = MultiObjective.from_campaign(cfg)
    others = objectives.properties[1:]
    path = Path(file)
    df = pd.read_csv(path, usecols=lambda c: c in {dataset.id_column, *others})
    missing = [p for p in others if p not in df.columns]
    if missing:
        raise BenchmarkError(f"{path}: property column(s) {missing} of the objectives/constraints not in the file")
    if dataset.id_column in df.columns:
        df = df.set_index(df[dataset.id_column].astype(str))
        frame = df.reindex(dataset.ids)
    else:
        frame = df.iloc[: len(dataset.ids)]
    dataset.extra = {p: frame[p].to_numpy(dtype=float) for p in others}
    dataset.objectives = objectives
    dataset.extensive_by = {o.property: bool(o.extensive) for o in cfg.all_objectives}
    logger.info("%s: %r over %d candidates", dataset.name, objectives, dataset.pool_size)


def truth_matrix(dataset: Any) -> np.ndarray:
    """``N x p`` recorded values of every modelled property (first objective first)."""
    return np.column_stack([dataset.truth, *[dataset.extra[p] for p in dataset.objectives.properties[1:]]])


def pool_front(dataset: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """The pool's true front (row indices), the reference point (utilities) and the front's hypervolume."""
    from sdl.benchmark import BenchmarkError

    objectives: MultiObjective = dataset.objectives
    Y = truth_matrix(dataset)
    front = np.flatnonzero(objectives.front(Y))
    if front.size == 0:
        raise BenchmarkError(f"{dataset.source}: no candidate of the pool meets the constraints")
    ref = objectives.reference_utility(Y)
    volume = objectives.hypervolume(Y[front], ref)
    if not volume > 0:
        raise BenchmarkError(f"{dataset.source}: the pool's front has no hypervolume above the reference point "
                             f"{objectives.reference_point}")
    return front, ref, volume


def hypervolume_curves(
    indices: Sequence[Sequence[int]], dataset: Any, ref: np.ndarray, scale: float
) -> list[list[float]]:
    """One curve per seed: the normalised hypervolume after each experiment (true values of the rows)."""
    Y = truth_matrix(dataset)
    return [dataset.objectives.hypervolume_curve(Y[np.asarray(rows, dtype=np.int64)], ref, scale).tolist()
            for rows in indices]


def hypervolume_summary(curves: Sequence[Sequence[float]], at: Sequence[int] = ()) -> dict[str, Any]:
    """Median / IQR curve over seeds, and the median at chosen experiment counts."""
    arr = np.asarray(curves, dtype=float)
    q25, med, q75 = np.percentile(arr, [25, 50, 75], axis=0)
    out: dict[str, Any] = {"hypervolume_median": med.tolist(), "hypervolume_q25": q25.tolist(),
                           "hypervolume_q75": q75.tolist()}
    out["hypervolume_at"] = {str(k): float(med[k - 1]) for k in at if 0 < k <= arr.shape[1]}
    return out

