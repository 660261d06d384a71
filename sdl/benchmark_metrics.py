"""Benchmark metrics for pool replays: recall of the top set, experiments-to-k, EF, AF.

Why a module of its own: the numbers the README reports must not depend on the engine, so they are
plain numpy functions over (measurement order, ground truth) that tests check by hand.

Definitions (Liang et al. 2021, *npj Comput. Mater.* 7:188; Rohr et al. 2020, *Chem. Sci.* 11:2696):

- Pool of ``N`` designs with ground-truth values (per-design mean of the real replicates).
- Top set: the best ``M = ceil(top_fraction * N)`` designs (largest for ``max``, smallest for ``min``;
  ties broken by pool order).
- Recall after ``i`` experiments: (top designs among the first ``i`` measured) / ``M``.
- Experiments to a recall level ``r``: the smallest ``i`` with at least ``ceil(r * M)`` top designs
  found (``None`` when the budget ends first).
- Random search, analytic expectation (sampling without replacement): after ``i`` draws it has found
  ``i * M / N`` top designs on average (recall ``i / N``); it needs ``k (N + 1) / (M + 1)`` draws on
  average to find ``k`` of them.
- Best of ``n`` random draws (without replacement) among ``N`` ranked values (1 = best): its rank
  is ``(N + 1) / (n + 1)`` on average, and at most ``r`` with probability ``1 - C(N-r, n) / C(N, n)``.
- Enhancement factor ``EF(i) = recall_strategy(i) / recall_random(i)`` with the analytic
  ``recall_random(i) = i / N``.
- Acceleration factor ``AF(r) = n_random(r) / n_strategy(r)`` with the analytic
  ``n_random = k (N + 1) / (M + 1)``, ``k = ceil(r * M)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "top_count",
    "top_set",
    "recall_curve",
    "experiments_to",
    "best_so_far",
    "random_expected_recall",
    "random_expected_experiments",
    "random_expected_best_rank",
    "random_best_rank_at_most",
    "enhancement_factor",
    "acceleration_factor",
    "median_iqr",
    "summarize_strategy",
]


def top_count(pool_size: int, top_fraction: float) -> int:
    """Size ``M = ceil(top_fraction * N)`` of the top set (at least 1).

    A tiny epsilon keeps ``0.05 * 600 = 30.000000000000004`` at 30.
    """
    if pool_size <= 0:
        raise ValueError(f"pool_size must be positive, got {pool_size=}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction=}")
    return max(1, math.ceil(top_fraction * pool_size - 1e-9))


def top_set(values: Sequence[float] | np.ndarray, goal: str, top_fraction: float) -> np.ndarray:
    """Pool indices of the best ``ceil(top_fraction * N)`` designs.

    Args:
        values: Ground-truth value per pool row, ``[N]``.
        goal: ``"max"`` or ``"min"`` (``"maximize"``/``"minimize"`` accepted).
        top_fraction: Fraction of the pool that counts as "top".

    Returns:
        Sorted int array of pool indices, ``[M]``.
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("values contain NaN; drop those rows before benchmarking")
    m = top_count(arr.size, top_fraction)
    key = -arr if _is_max(goal) else arr
    order = np.argsort(key, kind="stable")
    return np.sort(order[:m])


def recall_curve(order: Sequence[int], top: Sequence[int] | np.ndarray) -> np.ndarray:
    """Recall of the top set after each experiment (``[len(order)]``, values in [0, 1]).

    Args:
        order: Pool indices in the order they were measured (no repeats).
        top: Pool indices of the top set.
    """
    top_idx = {int(t) for t in np.asarray(top).ravel()}
    if not top_idx:
        raise ValueError("top set is empty")
    order_list = [int(o) for o in order]
    if len(set(order_list)) != len(order_list):
        raise ValueError("order repeats a pool index; a replay never measures a design twice")
    hits = np.fromiter((1 if o in top_idx else 0 for o in order_list), dtype=float, count=len(order_list))
    return np.cumsum(hits) / len(top_idx)


def experiments_to(recall: Sequence[float] | np.ndarray, level: float, n_top: int) -> int | None:
    """First experiment (1-based) at which ``ceil(level * n_top)`` top designs were found, else None."""
    k = max(1, math.ceil(level * n_top - 1e-9))
    counts = np.rint(np.asarray(recall, dtype=float) * n_top)
    reached = np.nonzero(counts >= k)[0]
    return int(reached[0]) + 1 if reached.size else None


def best_so_far(values: Sequence[float] | np.ndarray, goal: str) -> np.ndarray:
    """Running best of ``values`` in measurement order (max or min by ``goal``)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return arr
    # fmax/fmin skip NaN (a failed synthesis has no value) until the first real one.
    return np.fmax.accumulate(arr) if _is_max(goal) else np.fmin.accumulate(arr)


def random_expected_recall(i: int | np.ndarray, pool_size: int) -> np.ndarray | float:
    """Expected recall of random search after ``i`` draws without replacement: ``i / N``."""
    return np.minimum(np.asarray(i, dtype=float) / pool_size, 1.0)


def random_expected_experiments(k: int, pool_size: int, n_top: int) -> float:
    """Expected draws for random search to find ``k`` of ``M`` top designs in ``N``: ``k (N+1)/(M+1)``."""
    if not 0 <= k <= n_top:
        raise ValueError(f"k must be in [0, n_top], got {k=} {n_top=}")
    return k * (pool_size + 1) / (n_top + 1)


def random_expected_best_rank(pool_size: int, n: int) -> float:
    """Mean rank (1 = best) of the best of ``n`` random draws without replacement from ``N``: ``(N+1)/(n+1)``."""
    if not 1 <= n <= pool_size:
        raise ValueError(f"n must be in [1, pool_size], got {n=} {pool_size=}")
    return (pool_size + 1) / (n + 1)


def random_best_rank_at_most(pool_size: int, n: int, rank: int) -> float:
    """Probability that the best of ``n`` random draws from ``N`` has rank ``<= rank``: ``1 - C(N-r, n)/C(N, n)``.

    Why: "rank 4 of 400" is judged by how often random search, with the same budget, does as well.
    """
    if not 1 <= n <= pool_size or not 1 <= rank <= pool_size:
        raise ValueError(f"need 1 <= n, rank <= pool_size, got {n=} {rank=} {pool_size=}")
    return 1.0 - math.comb(pool_size - rank, n) / math.comb(pool_size, n)


def enhancement_factor(recall: Sequence[float] | np.ndarray, pool_size: int) -> np.ndarray:
    """``EF(i) = recall(i) / (i / N)`` for ``i = 1..len(recall)`` (analytic random baseline)."""
    r = np.asarray(recall, dtype=float)
    i = np.arange(1, r.size + 1, dtype=float)
    return r / (i / pool_size)


def acceleration_factor(n_strategy: float | None, level: float, pool_size: int, n_top: int) -> float | None:
    """``AF = n_random / n_strategy`` at recall ``level`` (analytic random), None if not reached."""
    if n_strategy is None or math.isnan(n_strategy):
        return None
    k = max(1, math.ceil(level * n_top - 1e-9))
    return random_expected_experiments(k, pool_size, n_top) / float(n_strategy)


def median_iqr(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, 25th and 75th percentiles over seeds; a None (not reached) counts as +infinity.

    Why +infinity: a seed that did not reach the level needed *more* than the budget, so it belongs
    at the top of the order; a median that lands on such a seed is reported as None.
    """
    arr = np.array([math.inf if v is None else float(v) for v in values], dtype=float)
    if arr.size == 0:
        return {"median": None, "q25": None, "q75": None, "reached": 0, "n": 0}
    finite = np.isfinite(arr).all()
    q25, med, q75 = np.percentile(arr, [25, 50, 75], method="linear") if finite else _inf_percentiles(arr)

    def clean(x: float) -> float | None:
        return None if not math.isfinite(x) else float(x)

    return {
        "median": clean(med),
        "q25": clean(q25),
        "q75": clean(q75),
        "reached": int(np.isfinite(arr).sum()),
        "n": int(arr.size),
    }


def summarize_strategy(
    recalls: Sequence[Sequence[float] | np.ndarray],
    best: Sequence[Sequence[float] | np.ndarray],
    pool_size: int,
    n_top: int,
    levels: Sequence[float] = (0.5, 1.0),
) -> dict[str, Any]:
    """Median/IQR curves and per-level statistics for one strategy over its seeds.

    Args:
        recalls: One recall curve per seed (equal lengths).
        best: One best-so-far curve per seed (equal lengths).
        pool_size: ``N``.
        n_top: ``M``.
        levels: Recall levels for experiments-to / AF.

    Returns:
        A JSON-able dict: ``recall_median``/``recall_q25``/``recall_q75`` curves, ``ef_median`` curve,
        ``best_so_far_median``/``_q25``/``_q75`` curves, and ``levels`` keyed by ``"0.5"`` etc. with
        ``experiments`` (median/IQR), ``random_expected`` and ``af_median``.
    """
    r = np.asarray(recalls, dtype=float)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"recalls must be seeds x experiments, got shape {r.shape}")
    q25, med, q75 = np.percentile(r, [25, 50, 75], axis=0)
    b = np.asarray(best, dtype=float)
    bq25, bmed, bq75 = np.percentile(b, [25, 50, 75], axis=0)
    out: dict[str, Any] = {
        "recall_median": med.tolist(),
        "recall_q25": q25.tolist(),
        "recall_q75": q75.tolist(),
        "ef_median": enhancement_factor(med, pool_size).tolist(),
        "best_so_far_median": bmed.tolist(),
        "best_so_far_q25": bq25.tolist(),
        "best_so_far_q75": bq75.tolist(),
        "levels": {},
    }
    for level in levels:
        per_seed = [experiments_to(curve, level, n_top) for curve in r]
        stats = median_iqr(per_seed)
        k = max(1, math.ceil(level * n_top - 1e-9))
        rand = random_expected_experiments(k, pool_size, n_top)
        out["levels"][_level_key(level)] = {
            "k": k,
            "experiments": per_seed,
            "experiments_stats": stats,
            "random_expected": rand,
            "af_median": acceleration_factor(stats["median"], level, pool_size, n_top),
        }
    return out


def _level_key(level: float) -> str:
    return f"{level:g}"


def _inf_percentiles(arr: np.ndarray) -> tuple[float, float, float]:
    """Percentiles by the 'lower'/'higher' neighbours so an infinite neighbour gives infinity, not NaN."""
    s = np.sort(arr)
    out = []
    for q in (25, 50, 75):
        pos = (s.size - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        frac = pos - lo
        if lo == hi or frac == 0.0:
            out.append(float(s[lo]))
        elif not math.isfinite(s[hi]):
            out.append(math.inf)
        else:
            out.append(float(s[lo] + frac * (s[hi] - s[lo])))
    return out[0], out[1], out[2]


def _is_max(goal: str) -> bool:
    g = goal.lower()
    if g in ("max", "maximize", "maximise"):
        return True
    if g in ("min", "minimize", "minimise"):
        return False
    raise ValueError(f"goal must be 'max' or 'min', got {goal=}")
