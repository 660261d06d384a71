"""The random baseline is exact (checked against full enumeration), and the page's figures are drawn."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from sdl.report.baseline import random_best_of_n


@pytest.mark.parametrize("goal", ["maximize", "minimize"])
def test_random_best_of_n_matches_enumeration(goal: str) -> None:
    values = np.array([0.3, -1.2, 2.5, 0.3, 1.1, -0.4, 0.9])  # a tie included
    base = random_best_of_n(values, goal, n_max=7, quantiles=(0.25, 0.75))
    assert base is not None and base.mean.shape == (7,) and base.pool_size == 7
    pick = max if goal == "maximize" else min
    for n in range(1, 8):
        bests = np.array([pick(c) for c in itertools.combinations(values, n)])
        assert base.mean[n - 1] == pytest.approx(bests.mean(), abs=1e-12)
        utility = np.sort(bests if goal == "maximize" else -bests)
        # the band's edges are utility quantiles of the exact distribution (lower: smallest u with CDF >= q)
        lo_u = utility[int(np.ceil(0.25 * utility.size - 1e-9)) - 1]
        hi_u = utility[int(np.ceil(0.75 * utility.size - 1e-9)) - 1]
        lo, hi = (lo_u, hi_u) if goal == "maximize" else (-hi_u, -lo_u)
        assert (base.low[n - 1], base.high[n - 1]) == pytest.approx((lo, hi))
    assert base.mean[-1] == pick(values)  # every draw: the pool's best


def test_random_best_of_n_has_no_direction_for_a_target() -> None:
    assert random_best_of_n([1.0, 2.0], "target", 2) is None
    assert random_best_of_n([], "maximize", 3) is None
    base = random_best_of_n([1.0, float("nan"), 3.0], "maximize", 10)  # NaN ignored, n clipped to N
    assert base is not None and base.mean.tolist() == [2.0, 3.0]


def test_round_plots_of_a_simulated_campaign(tmp_path: Path) -> None:
    from test_lab import world_values, write_campaign

    from sdl.config import load_campaign
    from sdl.report import RoundData, draw_round_plots

    cfg = load_campaign(write_campaign(tmp_path, name="plots"))
    truth = world_values()
    best = sorted(truth, key=truth.__getitem__)[:2]  # two of the world's top 5 % (lowest e_form)
    keys = ["perov_33", *best]
    values = [truth[k] for k in keys]
    data = RoundData(keys, values, values, [v + 0.1 for v in values], [0.2] * 3)
    paths = draw_round_plots(cfg, "minimize", data, tmp_path / "plots")
    assert set(paths) == {"best_so_far", "parity", "calibration", "recall"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths.values())
