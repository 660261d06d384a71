"""Objectives: one utility per measurement, a BoTorch MC objective, best value."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdl.engine.objectives import Objective


def test_utilities_of_the_three_goals() -> None:
    y = np.array([0.5, 1.1, 1.4, 1.7, 2.5])
    np.testing.assert_allclose(Objective("maximize").utility(y), y)
    np.testing.assert_allclose(Objective("minimize").utility(y), -y)
    gap = Objective("target", target_range=(1.1, 1.7))
    np.testing.assert_allclose(gap.utility(y), [-0.6, 0.0, 0.0, 0.0, -0.8])
    assert gap.best_value([0.5, 2.5, 1.3, 0.9]) == 1.3
    assert Objective("minimize").best_value([3.0, float("nan"), -1.0]) == -1.0
    assert Objective("maximize").best_value([]) is None


def test_from_config_and_validation() -> None:
    obj = Objective.from_any(NS(property="gap", unit="eV", goal="target", target_range=[1.1, 1.7]))
    assert obj.target_range == (1.1, 1.7) and obj.property == "gap"
    with pytest.raises(ValueError, match="target_range"):
        Objective("target")
    with pytest.raises(ValueError, match="goal"):
        Objective("largest")  # type: ignore[arg-type]


def test_mc_objective_keeps_gradients_and_shape() -> None:
    samples = torch.tensor([[[0.9], [1.3], [2.0]]], dtype=torch.float64, requires_grad=True)  # 1 x q=3 x m=1
    u = Objective("target", target_range=(1.1, 1.7)).mc_objective()(samples)
    assert u.shape == (1, 3)
    torch.testing.assert_close(u, torch.tensor([[-0.2, 0.0, -0.3]], dtype=torch.float64))
    u.sum().backward()
    assert samples.grad is not None


@settings(max_examples=60, deadline=None)
@given(mean=st.floats(-5, 5), std=st.floats(0, 3), z=st.floats(-1, 1),
       goal=st.sampled_from(["maximize", "minimize", "target"]))
def test_optimistic_score_bounds_the_utility_in_the_band(mean: float, std: float, z: float, goal: str) -> None:
    obj = Objective(goal, target_range=(-0.5, 0.7) if goal == "target" else None)  # type: ignore[arg-type]
    beta = 4.0
    y = torch.tensor([mean + z * 2.0 * std], dtype=torch.float64)
    bound = obj.optimistic(torch.tensor([mean], dtype=torch.float64), torch.tensor([std], dtype=torch.float64), beta)
    assert float(obj.utility(y)) <= float(bound) + 1e-9


def test_stopping_goal() -> None:
    assert Objective("maximize").reached(3.0, 2.5) and Objective("maximize").reached(2.5, 2.5)
    assert not Objective("maximize").reached(1.0, 2.5) and not Objective("maximize").reached(3.0, None)
    assert Objective("minimize").reached(-3.0, -2.0) and Objective("minimize").reached(-2.0, -2.0)
    assert not Objective("minimize").reached(1.0, -2.0)
    assert not Objective("maximize").reached(None, 0.0) and not Objective("minimize").reached(float("nan"), 0.0)
    gap = Objective("target", target_range=(1.1, 1.7))
    assert gap.reached(1.5, 0.0) and gap.reached(1.1, 0.0) and gap.reached(1.7, 9.9) and gap.reached(1.3)
    assert not gap.reached(1.8, 0.0) and not gap.reached(1.0, 5.0) and not gap.reached(None, 0.0)
    # with best_value: the one definition of the best measurement feeds the one definition of "reached"
    assert Objective("maximize").reached(Objective("maximize").best_value([1.0, 3.0]), 2.5)
    assert gap.reached(gap.best_value([0.2, 1.5])) and not gap.reached(gap.best_value([0.2, 1.8]))


def test_is_better_in_each_direction() -> None:
    up, down = Objective("maximize"), Objective("minimize")
    gap = Objective("target", target_range=(1.1, 1.7))
    assert up.is_better(2.0, 1.0) and not up.is_better(1.0, 2.0) and not up.is_better(1.0, 1.0)
    assert down.is_better(1.0, 2.0) and not down.is_better(2.0, 1.0) and not down.is_better(1.0, 1.0)
    assert gap.is_better(1.5, 2.0) and gap.is_better(1.0, 0.5) and gap.is_better(1.8, 0.9)
    assert not gap.is_better(1.2, 1.6)  # both inside the range: equally good
    for obj in (up, down, gap):
        assert obj.is_better(0.3, None) and not obj.is_better(float("nan"), None)
        assert obj.is_better(0.3, float("nan")) and not obj.is_better(float("nan"), 0.3)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=12),
       goal=st.sampled_from(["maximize", "minimize", "target"]))
def test_is_better_agrees_with_utility_and_best_value(values: list[float], goal: str) -> None:
    obj = Objective(goal, target_range=(-1.0, 2.0) if goal == "target" else None)  # type: ignore[arg-type]
    best: float | None = None
    for v in values:
        if obj.is_better(v, best):
            best = v
    assert best == obj.best_value(values)
    u = obj.utility(np.array(values))
    for a, ua in zip(values, u, strict=True):
        assert obj.scalar_utility(a) == pytest.approx(float(ua))
        assert all(obj.is_better(a, b) == (float(ua) > float(ub)) for b, ub in zip(values, u, strict=True))
