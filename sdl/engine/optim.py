"""Pick a q-batch: over a finite pool (chunked, sequential greedy) or in a box (``optimize_acqf``).

Why our own greedy loop and not ``optimize_acqf_discrete``: it is the same algorithm (score all
choices in chunks, take the arg-max, add it to ``X_pending``, repeat q times), but we need the
*row numbers* of the chosen candidates, not their feature vectors: two crystals can share a
composition descriptor and must stay two candidates. Memory is bounded by ``chunk`` rows per call.

Large pools are first cut to the ``k`` best rows by a cheap optimistic score
(:meth:`sdl.engine.objectives.Objective.optimistic` of the posterior mean and std) before any q > 1
acquisition, so the sequential-greedy cost does not grow with the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sdl.engine.objectives import Objective

__all__ = ["StreamingTopK", "greedy_select", "top_k", "thompson_select", "optimize_box"]

logger = logging.getLogger(__name__)


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores (ties broken by position, so deterministic)."""
    k = min(int(k), score.shape[0])
    order = torch.argsort(score, descending=True, stable=True)
    return order[:k]


class StreamingTopK:
    """The ``k`` best rows of a pool scored chunk by chunk, in any chunk order.

    Why: a pool scored in chunks (on a Dask cluster, chunks arrive in any order) never needs all
    scores sorted at once; keeping the best ``k`` so far and merging each chunk into them gives
    exactly :func:`top_k` over the whole pool (ties broken by row number), in ``O(k + chunk)`` memory.

    Args:
        k: How many rows to keep.
    """

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self._rows = np.zeros(0, dtype=np.int64)
        self._scores = torch.zeros(0, dtype=torch.float64)

    def add(self, rows: np.ndarray, scores: torch.Tensor) -> None:
        """Merge a chunk: ``rows`` (pool row numbers) and their ``scores`` (higher is better)."""
        all_rows = np.concatenate([self._rows, np.asarray(rows, dtype=np.int64)])
        all_scores = torch.cat([self._scores, scores.to(torch.float64).reshape(-1)])
        order = np.argsort(all_rows, kind="stable")  # row order, so that ties go to the lower row
        all_rows, all_scores = all_rows[order], all_scores[torch.as_tensor(order)]
        keep = top_k(all_scores, self.k).numpy()
        self._rows, self._scores = all_rows[keep], all_scores[torch.as_tensor(keep)]

    def rows(self) -> np.ndarray:
        """The kept rows, best first (ties by row number)."""
        return self._rows.copy()


def _score(acqf: Any, X: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([acqf(part) for part in torch.split(X.unsqueeze(-2), chunk)]).reshape(-1)


def greedy_select(
    acqf: Any, choices: torch.Tensor, q: int, chunk: int = 4096,
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[int], list[float]]:
    """Sequential greedy q-batch over ``choices`` (``n x d``), each pick joining ``X_pending``.

    ``transform(values, rows)`` rewrites the acquisition values of the rows ``rows`` of ``choices``
    before the arg-max (e.g. weighting by P(success), :func:`sdl.engine.feasibility.weigh`).

    Returns:
        Row numbers into ``choices`` (distinct, at most ``min(q, n)``) and their acquisition values.
    """
    n = choices.shape[0]
    base_pending = acqf.X_pending
    alive = torch.ones(n, dtype=torch.bool)
    picks: list[int] = []
    values: list[float] = []
    try:
        for _ in range(min(q, n)):
            rows = alive.nonzero().reshape(-1)
            vals = _score(acqf, choices[rows], chunk)
            if transform is not None:
                vals = transform(vals, rows)
            vals = torch.where(torch.isnan(vals), torch.full_like(vals, -torch.inf), vals)
            j = int(torch.argmax(vals))
            best = int(rows[j])
            picks.append(best)
            values.append(float(vals[j]))
            alive[best] = False
            chosen = choices[picks]
            acqf.set_X_pending(chosen if base_pending is None else torch.cat([base_pending, chosen], dim=-2))
    finally:
        acqf.set_X_pending(base_pending)
    return picks, values


def thompson_select(
    draw: torch.Tensor, objective: Objective, q: int
) -> tuple[list[int], list[float]]:
    """Thompson sampling: for each of ``q`` slots take the arg-max utility of one posterior draw.

    Args:
        draw: ``s x n`` posterior draws (``s >= q``; ensemble members or GP joint samples) over
            the available candidates; slot ``i`` uses draw ``i mod s``.
        objective: Utility of raw values.
        q: Batch size.

    Returns:
        Distinct row numbers into the candidates and the utility each won with.
    """
    n = draw.shape[-1]
    util = objective.utility(draw)
    taken = torch.zeros(n, dtype=torch.bool)
    picks: list[int] = []
    values: list[float] = []
    for i in range(min(q, n)):
        u = util[i % util.shape[0]].masked_fill(taken, -torch.inf)
        j = int(torch.argmax(u))
        picks.append(j)
        values.append(float(u[j]))
        taken[j] = True
    return picks, values


def optimize_box(
    acqf: Any, bounds: torch.Tensor, q: int, seed: int, num_restarts: int = 6, raw_samples: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``optimize_acqf`` in the encoded box, sequential greedy, reproducible under ``seed``.

    Returns:
        ``q x d`` encoded points (before rounding) and their acquisition values.
    """
    from botorch.optim import optimize_acqf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % (2**32))
        X, vals = optimize_acqf(
            acqf, bounds=bounds, q=q, num_restarts=num_restarts, raw_samples=raw_samples, sequential=True,
            options={"batch_limit": 8, "maxiter": 75, "seed": int(seed)},
        )
    if vals is None:  # only with return_best_only=False, which is not asked for here
        raise RuntimeError("optimize_acqf returned no acquisition values")
    return X.detach(), vals.detach().reshape(-1)
