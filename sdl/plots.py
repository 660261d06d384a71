"""All matplotlib figures of the project, drawn headless (Agg) to PNG files.

Why one module: benchmarks, the Prefect flow's artifacts and the README share one look, and only
this module touches matplotlib (imported lazily, so importing ``sdl.plots`` stays cheap).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sdl.report.baseline import RandomBaseline

__all__ = [
    "plot_recall_curves",
    "plot_best_so_far_curves",
    "plot_best_so_far",
    "plot_parity",
    "plot_calibration",
    "png_data_url",
    "plot_pareto_front",
    "plot_hypervolume_curves",
]

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    logger.debug("wrote %s", out)
    return out


def plot_recall_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    pool_size: int,
    n_top: int,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Median recall of the top set vs experiments, IQR band per strategy, analytic random dashed.

    Args:
        curves: strategy -> {"median": [...], "q25": [...], "q75": [...]} (one value per experiment).
        path: PNG file to write.
        pool_size: ``N`` (for the random expectation ``i / N``).
        n_top: ``M`` (shown in the axis label).
        title: Figure title.
        dpi: Resolution of the PNG (the flow's page uses a modest one to keep artifacts small).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    longest = 0
    for name, c in curves.items():
        med = np.asarray(c["median"], dtype=float)
        x = np.arange(1, med.size + 1)
        longest = max(longest, med.size)
        (line,) = ax.plot(x, med, label=name, lw=1.8)
        ax.fill_between(x, c["q25"], c["q75"], color=line.get_color(), alpha=0.2, lw=0)
    x = np.arange(1, longest + 1)
    ax.plot(x, np.minimum(x / pool_size, 1.0), "k--", lw=1, label="random (expected)")
    ax.set_xlabel("experiments")
    ax.set_ylabel(f"recall of top set (M = {n_top} of N = {pool_size})")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, max(longest, 2))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_best_so_far_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    goal_value: float | None = None,
    ylabel: str = "best value so far",
    title: str = "",
) -> Path:
    """Median best-so-far per strategy with IQR band; the pool's best value as a dotted line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, c in curves.items():
        med = np.asarray(c["median"], dtype=float)
        x = np.arange(1, med.size + 1)
        (line,) = ax.plot(x, med, label=name, lw=1.8)
        ax.fill_between(x, c["q25"], c["q75"], color=line.get_color(), alpha=0.2, lw=0)
    if goal_value is not None:
        ax.axhline(goal_value, color="k", ls=":", lw=1, label="best in pool")
    ax.set_xlabel("experiments")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_best_so_far(
    values: Sequence[float],
    goal: str,
    path: str | Path,
    *,
    ylabel: str = "value",
    baseline: RandomBaseline | None = None,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """One campaign's measurements in order with the running best (for flow artifacts).

    Args:
        values: Measured values in experiment order.
        goal: ``"max"``/``"maximize"`` or ``"min"``/``"minimize"`` (anything else: running max of utility
            is not defined, so only the points are drawn).
        path: PNG file to write.
        ylabel: Axis label (property and unit).
        baseline: The best of ``n`` random draws from the same pool (expectation dashed, quantile
            band shaded), when the pool's true values are known (a simulated world).
        title: Figure title.
        dpi: Resolution of the PNG.
    """
    plt = _pyplot()
    arr = np.asarray(values, dtype=float)
    x = np.arange(1, arr.size + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if baseline is not None and arr.size:
        n = min(max(arr.size, 2), baseline.mean.size)
        bx = np.arange(1, n + 1)
        lo, hi = baseline.quantiles
        ax.fill_between(bx, baseline.low[:n], baseline.high[:n], color="0.6", alpha=0.3, lw=0,
                        label=f"random, {lo:.0%}–{hi:.0%} of campaigns")
        ax.plot(bx, baseline.mean[:n], color="0.35", ls="--", lw=1.2, label="random, expected best")
    ax.plot(x, arr, "o", ms=3, alpha=0.6, label="measured")
    g = goal.lower()
    if arr.size and g in ("max", "maximize", "min", "minimize"):
        ok = np.where(np.isnan(arr), -np.inf if g.startswith("max") else np.inf, arr)
        run = np.maximum.accumulate(ok) if g.startswith("max") else np.minimum.accumulate(ok)
        ax.step(x, run, where="post", lw=1.8, label="best so far")
    ax.set_xlabel("experiment")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_parity(
    y_true: Sequence[float],
    y_pred: Sequence[float],
    y_std: Sequence[float] | None,
    path: str | Path,
    *,
    unit: str = "",
    dpi: int = 120,
) -> Path:
    """Predicted vs measured with ±1 std error bars and the y = x line (``unit`` on both axes)."""
    plt = _pyplot()
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    yerr = None if y_std is None else np.asarray(y_std, dtype=float)
    ax.errorbar(t, p, yerr=yerr, fmt="o", ms=3, alpha=0.6, elinewidth=0.6)
    if t.size:
        lo = float(np.nanmin([t.min(), p.min()]))
        hi = float(np.nanmax([t.max(), p.max()]))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        mae = float(np.mean(np.abs(t - p)))
        ax.set_title(f"parity (MAE {mae:.3g}, n = {t.size})", fontsize=10)
    suffix = f" ({unit})" if unit else ""
    ax.set_xlabel(f"measured{suffix}")
    ax.set_ylabel(f"predicted{suffix}")
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi)


def plot_calibration(
    y_true: Sequence[float], mean: Sequence[float], std: Sequence[float], path: str | Path, *, dpi: int = 120
) -> Path:
    """Observed vs expected fraction of truths inside central Gaussian intervals (miscalibration area shaded)."""
    from scipy.stats import norm

    plt = _pyplot()
    t = np.asarray(y_true, dtype=float)
    m = np.asarray(mean, dtype=float)
    s = np.clip(np.asarray(std, dtype=float), 1e-12, None)
    expected = np.linspace(0.0, 1.0, 51)
    z = np.abs(t - m) / s
    observed = np.array([np.mean(z <= norm.ppf(0.5 + p / 2.0)) if t.size else 0.0 for p in expected])
    area = float(np.trapezoid(np.abs(observed - expected), expected))
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot(expected, observed, lw=1.8, label="model")
    ax.fill_between(expected, expected, observed, alpha=0.2)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.set_xlabel("expected fraction inside interval")
    ax.set_ylabel("observed fraction inside interval")
    ax.set_title(f"calibration (miscalibration area {area:.3f})", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def png_data_url(path: str | Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URL.

    Why: the Prefect UI (v1 and v2, 3.8.8) renders a markdown image whose source is a ``data:image/``
    URL, while a ``file://`` link or a local path never opens in a browser.
    """
    import base64

    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def plot_pareto_front(
    Y: np.ndarray,
    front: np.ndarray,
    feasible: np.ndarray,
    path: str | Path,
    *,
    labels: tuple[str, str],
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Measured values of the first two objectives: the front (joined, in order), the rest, the infeasible.

    Args:
        Y: ``n x 2`` raw values of the two properties shown.
        front: ``[n]`` True on the Pareto front.
        feasible: ``[n]`` True where every constraint is met.
        labels: Axis labels (property and unit).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rest = feasible & ~front
    ax.scatter(Y[rest, 0], Y[rest, 1], s=18, color="0.55", label=f"feasible ({int(rest.sum())})")
    if (~feasible).any():
        ax.scatter(Y[~feasible, 0], Y[~feasible, 1], s=18, marker="x", color="tab:orange",
                   label=f"violates a constraint ({int((~feasible).sum())})")
    if front.any():
        order = np.argsort(Y[front, 0], kind="stable")
        ax.plot(Y[front, 0][order], Y[front, 1][order], "-o", color="tab:red", ms=5,
                label=f"Pareto front ({int(front.sum())})")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_hypervolume_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Median hypervolume (IQR shaded) per strategy after each experiment; 1 = the pool's whole front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, c in curves.items():
        x = np.arange(1, len(c["median"]) + 1)
        line = ax.plot(x, c["median"], label=name, color="0.4" if name == "random" else None,
                       ls="--" if name == "random" else "-")[0]
        ax.fill_between(x, c["q25"], c["q75"], alpha=0.2, color=line.get_color())
    ax.set_xlabel("experiments")
    ax.set_ylabel("hypervolume / pool front's")
    ax.set_ylim(0, 1.02)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)
