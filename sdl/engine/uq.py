"""Uncertainty-quality metrics: is the predicted std worth spending experiments on?

Why these: MAE/RMSE say how good the mean is; Spearman(|error|, std) says whether the model knows
*where* it is wrong (ranking, what acquisition needs); the miscalibration area and the 68 % / 95 %
coverages say whether the std has the right *size* (Tran et al. 2020, Mach. Learn.: Sci. Technol.
1, 025006, who report 0.12 for a CGCNN ensemble). Gaussian predictive intervals are assumed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["uncertainty_metrics", "miscalibration_area", "kfold_uncertainty"]

logger = logging.getLogger(__name__)


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    return arr


def _z_scores(err: np.ndarray, std: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        z: np.ndarray = np.abs(err) / std
    z[(std <= 0) & (err == 0)] = 0.0
    z[(std <= 0) & (err != 0)] = np.inf
    return z


def miscalibration_area(y_true: Any, mean: Any, std: Any, num_bins: int = 100) -> float:
    """Area between the observed and expected fraction of truths inside central Gaussian intervals.

    For expected proportions ``p`` on ``[0, 1]`` the observed proportion is the fraction with
    ``|y - mean| <= std * Phi^-1((1 + p) / 2)``; the area is the mean of ``|observed - p|`` over
    the grid (the trapezoid integral; 0 = perfectly calibrated, 0.5 = worst).

    Args:
        y_true: ``[N]`` truths. mean: ``[N]`` predicted means. std: ``[N]`` predicted stds (>= 0).
        num_bins: Grid points on ``[0, 1]``.
    """
    y, mu, sd = _as_1d(y_true, "y_true"), _as_1d(mean, "mean"), _as_1d(std, "std")
    z = _z_scores(y - mu, sd)
    expected = np.linspace(0.0, 1.0, num_bins + 1)
    bounds = stats.norm.ppf(0.5 + expected / 2.0)  # inf at p = 1
    observed = (z[None, :] <= bounds[:, None]).mean(axis=1)
    return float(np.trapezoid(np.abs(observed - expected), expected))


def uncertainty_metrics(y_true: Any, mean: Any, std: Any) -> dict[str, float | int]:
    """MAE, RMSE, Spearman(|error|, std), miscalibration area, 68 % / 95 % coverage and n.

    Args:
        y_true: ``[N]`` measured values. mean: ``[N]`` predicted means. std: ``[N]`` predicted stds.

    Raises:
        ValueError: On length mismatch, empty input, negative or non-finite std.
    """
    y, mu, sd = _as_1d(y_true, "y_true"), _as_1d(mean, "mean"), _as_1d(std, "std")
    if not (y.shape == mu.shape == sd.shape):
        raise ValueError(f"uncertainty_metrics: lengths differ: {y.shape[0]=}, {mu.shape[0]=}, {sd.shape[0]=}")
    if y.shape[0] == 0:
        raise ValueError("uncertainty_metrics: no points (n=0)")
    if not (np.isfinite(y).all() and np.isfinite(mu).all() and np.isfinite(sd).all()):
        raise ValueError("uncertainty_metrics: y_true, mean or std contains NaN/inf")
    if (sd < 0).any():
        raise ValueError(f"uncertainty_metrics: negative std (min={sd.min()})")
    err = y - mu
    abs_err = np.abs(err)
    if y.shape[0] > 2 and np.ptp(abs_err) > 0 and np.ptp(sd) > 0:
        rho = float(stats.spearmanr(abs_err, sd).statistic)
    else:
        rho = float("nan")
    z = _z_scores(err, sd)
    return {
        "mae": float(abs_err.mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "spearman_abs_error_std": rho,
        "miscalibration_area": miscalibration_area(y, mu, sd),
        "coverage_68": float((z <= stats.norm.ppf(0.5 + 0.6827 / 2)).mean()),
        "coverage_95": float((z <= 1.959964).mean()),
        "n": int(y.shape[0]),
    }


def kfold_uncertainty(
    fit_predict_fn: Callable[[Any, np.ndarray, Any], tuple[Any, Any]],
    X: Sequence[Any] | np.ndarray,
    y: Any,
    k: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out uncertainty metrics by k-fold cross-validation (run every round on measured data).

    Args:
        fit_predict_fn: ``(X_train, y_train, X_test) -> (mean, std)``; trains a fresh model.
        X: Inputs (a sequence of structures/keys, or an array indexed on its first axis).
        y: ``[N]`` measured values.
        k: Number of folds (reduced to N when N < k; N must be >= 2).
        seed: Seed of the fold shuffle.

    Returns:
        :func:`uncertainty_metrics` of the pooled out-of-fold predictions, plus ``k``,
        ``folds`` (metrics per fold) and ``oof_mean`` / ``oof_std`` (lists, input order).
    """
    y_arr = _as_1d(y, "y")
    n = y_arr.shape[0]
    if len(X) != n:
        raise ValueError(f"kfold_uncertainty: {len(X)=} differs from {n=}")
    if n < 2:
        raise ValueError(f"kfold_uncertainty: need at least 2 points, got {n=}")
    k_eff = min(int(k), n)
    if k_eff < 2:
        raise ValueError(f"kfold_uncertainty: need k >= 2, got {k=}")
    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(n), k_eff)

    def take(idx: np.ndarray) -> Any:
        if isinstance(X, np.ndarray):
            return X[idx]
        if hasattr(X, "__getitem__") and hasattr(X, "shape"):  # a tensor or another array type
            array_like: Any = X
            return array_like[idx]
        return [X[i] for i in idx]

    oof_mean = np.empty(n)
    oof_std = np.empty(n)
    per_fold = []
    for test_idx in folds:
        train_idx = np.setdiff1d(np.arange(n), test_idx)
        mu, sd = fit_predict_fn(take(train_idx), y_arr[train_idx], take(test_idx))
        oof_mean[test_idx] = _as_1d(mu, "mean")
        oof_std[test_idx] = _as_1d(sd, "std")
        per_fold.append(uncertainty_metrics(y_arr[test_idx], oof_mean[test_idx], oof_std[test_idx]))
    result: dict[str, Any] = dict(uncertainty_metrics(y_arr, oof_mean, oof_std))
    result["k"] = k_eff
    result["folds"] = per_fold
    result["oof_mean"] = oof_mean.tolist()
    result["oof_std"] = oof_std.tolist()
    return result
