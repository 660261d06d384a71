"""The figures of a campaign's page, drawn each round from what the lab measured.

Why apart from the lab: which plots a person needs (best so far against random, parity,
calibration, recall of the world's top set) is a reporting decision; the lab only hands over its
measurements and the predictions made when each experiment was proposed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdl.report.baseline import random_best_of_n

if TYPE_CHECKING:
    from sdl.config import CampaignConfig

__all__ = ["PAGE_DPI", "RECALL_TOP_FRACTION", "RoundData", "draw_round_plots", "objective_label", "objective_unit"]

logger = logging.getLogger(__name__)

PAGE_DPI = 80
"""Resolution of the page's PNGs: about 500 × 320 px, 15-30 kB each, embedded in the artifacts."""
RECALL_TOP_FRACTION = 0.05
"""The world's top set for the recall plot: the best 5 % (the benchmarks' default)."""


def objective_unit(cfg: CampaignConfig) -> str:
    """The objective's unit as written in the YAML (``objective.unit``), or ``""``.

    The one place the page looks the unit up: tables, axis labels and log lines all ask here.
    """
    return str(getattr(cfg.objective, "unit", None) or "")


def objective_label(cfg: CampaignConfig) -> str:
    """``"e_form (eV)"``: the objective's property with its unit, for axes and table headers."""
    unit = objective_unit(cfg)
    return f"{cfg.objective.property} ({unit})" if unit else cfg.objective.property


@dataclass(frozen=True)
class RoundData:
    """What the lab measured so far, in experiment order.

    Attributes:
        keys: Candidate keys of the completed experiments.
        values: Their measured values.
        y, mean, std: Measured value, and the prediction made at proposal time, of each completed
            experiment that had a prediction (the prospective parity and calibration).
    """

    keys: Sequence[str]
    values: Sequence[float]
    y: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]


def draw_round_plots(cfg: CampaignConfig, goal: str, data: RoundData, plot_dir: Path,
                     *, dpi: int = PAGE_DPI) -> dict[str, Path]:
    """Draw the page's PNGs into ``plot_dir`` (rewritten each round); returns name → file.

    ``best_so_far`` always; ``parity`` and ``calibration`` from two predicted measurements on;
    ``recall`` and the random band of ``best_so_far`` only where a simulated world tells the truth.
    A figure that fails is logged and left out: reporting must not stop the lab.
    """
    from sdl import plots
    from sdl.lab.simulation import world_values

    paths: dict[str, Path] = {}
    label = objective_label(cfg)
    unit = objective_unit(cfg)
    world = world_values(cfg)
    try:
        baseline = None if world is None else random_best_of_n(world[1], goal, max(len(data.values), 2))
        paths["best_so_far"] = plots.plot_best_so_far(
            data.values, goal, plot_dir / "best_so_far.png", ylabel=label, baseline=baseline,
            title=f"{cfg.name}: best {cfg.objective.property} so far", dpi=dpi)
        if len(data.y) >= 2:
            paths["parity"] = plots.plot_parity(data.y, data.mean, data.std, plot_dir / "parity.png",
                                                unit=unit, dpi=dpi)
            paths["calibration"] = plots.plot_calibration(data.y, data.mean, data.std,
                                                          plot_dir / "calibration.png", dpi=dpi)
        if world is not None and world[0] is not None and goal in ("maximize", "minimize") and data.keys:
            paths["recall"] = _recall(cfg, goal, world[0], world[1], data.keys, plot_dir / "recall.png", dpi)
    except Exception:
        logger.exception("could not draw the plots of %s", cfg.name)
    return paths


def _recall(cfg: CampaignConfig, goal: str, ids: list[str], truth: np.ndarray, keys: Sequence[str],
            path: Path, dpi: int) -> Path:
    """Recall of the world's top 5 % against experiments, with random's expectation ``i / N``."""
    from sdl import benchmark_metrics as bm
    from sdl import plots

    top = {ids[i] for i in bm.top_set(truth, goal, RECALL_TOP_FRACTION)}
    found = [float(v) for v in np.cumsum([key in top for key in keys]) / max(len(top), 1)]
    return plots.plot_recall_curves(
        {cfg.name: {"median": found, "q25": found, "q75": found}}, path, pool_size=len(ids),
        n_top=len(top), title=f"{cfg.name}: top {RECALL_TOP_FRACTION:.0%} of the world found", dpi=dpi)
