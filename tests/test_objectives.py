"""Objectives: one utility per measurement, a BoTorch MC objective, best value."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdl.objectives import Objective


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
@given(mean=st.floats(-5, 5), std=st.floats(0, 3), z=st.floats(-1, 1), goal=st.sampled_from(["maximize", "minimize", "target"]))
def test_optimistic_score_bounds_the_utility_in_the_band(mean: float, std: float, z: float, goal: str) -> None:
    obj = Objective(goal, target_range=(-0.5, 0.7) if goal == "target" else None)  # type: ignore[arg-type]
    beta = 4.0
    y = torch.tensor([mean + z * 2.0 * std], dtype=torch.float64)
    bound = obj.optimistic(torch.tensor([mean], dtype=torch.float64), torch.tensor([std], dtype=torch.float64), beta)
    assert float(obj.utility(y)) <= float(bound) + 1e-9


def test_stopping_goal() -> None:
    assert Objective("maximize").reached([1.0, 3.0], 2.5) and not Objective("maximize").reached([1.0], 2.5)
    assert Objective("minimize").reached([1.0, -3.0], -2.0) and not Objective("maximize").reached([1.0], None)
    gap = Objective("target", target_range=(1.1, 1.7))
    assert gap.reached([0.2, 1.5], None) and not gap.reached([0.2, 1.8], None) and gap.reached([1.8], 0.2)
