"""Uncertainty-quality metrics on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdl.engine.uq import kfold_uncertainty, miscalibration_area, uncertainty_metrics


def gaussian_case(n: int = 20_000, scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n)
    std = rng.uniform(0.1, 2.0, size=n)
    y = mean + std * rng.normal(size=n)
    return y, mean, std * scale


def test_calibrated_gaussians() -> None:
    y, mean, std = gaussian_case()
    m = uncertainty_metrics(y, mean, std)
    assert m["n"] == 20_000
    assert m["miscalibration_area"] < 0.01
    assert m["coverage_68"] == pytest.approx(0.6827, abs=0.01)
    assert m["coverage_95"] == pytest.approx(0.95, abs=0.005)
    # errors scale with std, so |error| and std rank together
    assert m["spearman_abs_error_std"] > 0.3


def test_overconfident_and_underconfident_are_penalised() -> None:
    y, mean, std = gaussian_case(scale=1 / 3)
    over = uncertainty_metrics(y, mean, std)
    assert over["miscalibration_area"] > 0.2 and over["coverage_68"] < 0.35
    y, mean, std = gaussian_case(scale=3)
    under = uncertainty_metrics(y, mean, std)
    assert under["miscalibration_area"] > 0.2 and under["coverage_95"] > 0.999


def test_point_metrics_known_values() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    mean = np.array([1.0, 2.5, 2.0, 6.0])  # errors 0, -0.5, 1, -2
    std = torch.tensor([0.1, 0.2, 0.3, 0.4])
    m = uncertainty_metrics(y, mean, std)
    assert m["mae"] == pytest.approx(0.875)
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 0.25 + 1 + 4) / 4))
    assert m["spearman_abs_error_std"] == pytest.approx(1.0)
    assert m["coverage_68"] == pytest.approx(0.25)  # only the exact prediction is inside 1 sigma
    assert miscalibration_area(y, y, np.zeros(4)) == pytest.approx(0.5, abs=0.01)


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="lengths"):
        uncertainty_metrics([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="negative std"):
        uncertainty_metrics([1.0], [1.0], [-1.0])
    with pytest.raises(ValueError, match="n=0"):
        uncertainty_metrics([], [], [])
    with pytest.raises(ValueError, match="NaN"):
        uncertainty_metrics([np.nan], [1.0], [1.0])


def test_kfold_covers_every_point_once() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.3, size=300)
    seen: list[int] = []

    def fit_predict(x_train, y_train, x_test):
        seen.append(len(x_test))
        coef, *_ = np.linalg.lstsq(x_train, y_train, rcond=None)
        resid = np.std(y_train - x_train @ coef)
        return x_test @ coef, np.full(len(x_test), resid)

    out = kfold_uncertainty(fit_predict, X, y, k=5, seed=0)
    assert sum(seen) == 300 and len(seen) == 5
    assert out["mae"] == pytest.approx(0.3 * np.sqrt(2 / np.pi), rel=0.15)
    assert out["coverage_68"] == pytest.approx(0.68, abs=0.07)
    assert out["miscalibration_area"] < 0.08
    again = kfold_uncertainty(fit_predict, X, y, k=5, seed=0)
    assert again["oof_mean"] == out["oof_mean"]
    with pytest.raises(ValueError, match="differs"):
        kfold_uncertainty(fit_predict, X[:10], y, k=5)
