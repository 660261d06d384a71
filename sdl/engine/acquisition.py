"""Acquisition functions by name: qUCB, qLogEI, qLogNEI, max-variance (pure exploration), Thompson.

Why direct constructors and no registry: there are five names, each one line of BoTorch. All of
them are Monte-Carlo acquisitions, so they work on a GP and on the pool ensemble alike, with
q-batches and with pending experiments as ``X_pending`` (BoTorch joins pending points to every
q-batch, so a candidate that duplicates what is already running earns little).

The utility (:class:`sdl.engine.objectives.Objective`) enters as a ``GenericMCObjective`` on posterior
samples, except for max-variance, which explores the raw property. Thompson sampling is not an
acquisition value but a selection rule; it lives in :func:`sdl.engine.optim.thompson_select`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from botorch.acquisition import (
    AcquisitionFunction,
    qLogExpectedImprovement,
    qLogNoisyExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.monte_carlo import MCAcquisitionFunction
from botorch.models.ensemble import EnsembleModel
from botorch.sampling.base import MCSampler
from botorch.sampling.normal import SobolQMCNormalSampler
from botorch.utils.transforms import concatenate_pending_points, t_batch_mode_transform

from sdl.engine.models.pool_ensemble import MemberSampler
from sdl.engine.objectives import Objective

__all__ = ["ACQUISITIONS", "qMaxVariance", "build_acquisition", "default_sampler", "pool_acquisition"]

logger = logging.getLogger(__name__)

ACQUISITIONS = ("qucb", "qlogei", "qlognei", "max-variance", "thompson")


class qMaxVariance(MCAcquisitionFunction):
    """Pure exploration: ``E[max_q sqrt(pi/2) |Y - E Y|]`` over the joint q-batch (+ pending points).

    For ``q = 1`` with a Gaussian posterior this is the posterior std; for a batch it is qUCB's
    exploration term, so points that move together with pending or already chosen ones (same
    members disagreeing the same way, or correlated under a GP) add little.

    Args:
        model: A BoTorch model (GP or ensemble).
        sampler: MC sampler (a :class:`MemberSampler` for ensembles).
        X_pending: ``m x d`` pending points.
    """

    def __init__(self, model: Any, sampler: MCSampler | None = None, X_pending: torch.Tensor | None = None) -> None:
        super().__init__(model=model, sampler=sampler, X_pending=X_pending)

    @concatenate_pending_points
    # botorch annotates the decorator for methods of the AcquisitionFunction base class, so a
    # subclass's own method (self: qMaxVariance) does not match it; the decorator works on any.
    @t_batch_mode_transform()  # type: ignore[arg-type]
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """``batch x q x d`` -> ``batch`` values."""
        _, obj = self._get_samples_and_objectives(X)  # sample x batch x q
        dev = (obj - obj.mean(dim=0, keepdim=True)).abs() * math.sqrt(math.pi / 2.0)
        return dev.max(dim=-1).values.mean(dim=0)


def default_sampler(model: Any, seed: int, num_samples: int = 128) -> MCSampler:
    """Every member once for ensembles; a seeded scrambled-Sobol normal sampler otherwise."""
    if isinstance(model, EnsembleModel):
        # PoolEnsembleModel says its size; other ensembles keep member predictions (M x ...) as a buffer.
        size = getattr(model, "ensemble_size", None) or cast(torch.Tensor, model.predictions).shape[0]
        return MemberSampler(int(size))
    return SobolQMCNormalSampler(sample_shape=torch.Size([num_samples]), seed=int(seed))


def build_acquisition(
    name: str,
    model: Any,
    objective: Objective,
    *,
    X_baseline: torch.Tensor,
    y_baseline: torch.Tensor,
    X_pending: torch.Tensor | None = None,
    beta: float = 2.0,
    seed: int = 0,
) -> AcquisitionFunction:
    """Construct the acquisition ``name`` on ``model``.

    Args:
        name: One of :data:`ACQUISITIONS` except ``thompson``.
        model: Fitted GP or :class:`~sdl.engine.models.pool_ensemble.PoolEnsembleModel`.
        objective: Turns raw posterior samples into utilities.
        X_baseline: ``n x d`` inputs already measured (qLogNEI's baseline).
        y_baseline: ``n`` raw measured values (qLogEI's incumbent = best utility).
        X_pending: ``m x d`` pending inputs (proposed or running, not yet measured).
        beta: qUCB's exploration weight.
        seed: Seed of the MC sampler (GP).

    Raises:
        ValueError: Unknown name (listing the known ones).
    """
    name = name.lower()
    sampler = default_sampler(model, seed)
    mc_obj = objective.mc_objective()
    pending = X_pending if X_pending is not None and X_pending.numel() else None
    if name == "qucb":
        return qUpperConfidenceBound(model, beta=beta, sampler=sampler, objective=mc_obj, X_pending=pending)
    if name == "qlogei":
        best_f = objective.utility(y_baseline.to(torch.float64)).max()
        return qLogExpectedImprovement(model, best_f=best_f, sampler=sampler, objective=mc_obj, X_pending=pending)
    if name == "qlognei":
        from botorch.models import MultiTaskGP

        cacheable = not isinstance(model, EnsembleModel | MultiTaskGP)  # BoTorch caches single-task GPs only
        return qLogNoisyExpectedImprovement(
            model, X_baseline=X_baseline, sampler=sampler, objective=mc_obj, X_pending=pending,
            prune_baseline=True, cache_root=cacheable,
        )
    if name == "max-variance":
        return qMaxVariance(model, sampler=sampler, X_pending=pending)
    raise ValueError(f"acquisition.function: unknown {name!r}; known: {', '.join(ACQUISITIONS)}")


def pool_acquisition(
    name: str,
    model: Any,
    objective: Objective,
    X_all: torch.Tensor,
    choices: np.ndarray,
    *,
    baseline_rows: Sequence[int],
    y_baseline: torch.Tensor,
    pending_rows: Sequence[int] = (),
    beta: float = 2.0,
    seed: int = 0,
) -> tuple[AcquisitionFunction, torch.Tensor]:
    """The acquisition ``name`` for a greedy pick among the pool rows ``choices``, and one input per choice.

    A single-output GP gets its joint posterior over ``choices``, pending and baseline rows computed once
    (:func:`sdl.engine.models.candidate_set.candidate_set_model`): the acquisition is built on that
    and its inputs are row numbers into the set, so each greedy step gathers instead of running the
    GP's posterior. Every other model acquires on ``X_all`` rows through its own posterior.

    Args:
        X_all: ``N x d`` acquisition inputs of every pool row.
        choices: Pool rows to pick from (the shortlist).
        baseline_rows: Measured pool rows (qLogNEI's baseline).
        pending_rows: Pool rows of pending experiments (``X_pending``).
        name, model, objective, y_baseline, beta, seed: As for :func:`build_acquisition`.

    Returns:
        The acquisition and the ``len(choices) x d'`` inputs that :func:`sdl.engine.optim.greedy_select`
        picks from (in the order of ``choices``).
    """
    from sdl.engine.models.candidate_set import candidate_set_model

    base = torch.as_tensor(np.asarray(baseline_rows, dtype=np.int64))
    pend = torch.as_tensor(np.asarray(pending_rows, dtype=np.int64))
    rows = torch.cat([torch.as_tensor(np.asarray(choices, dtype=np.int64)), pend, base])
    fast = candidate_set_model(model, X_all[rows])
    if fast is None:
        inputs, acq_model = X_all, model
    else:
        inputs, acq_model = torch.arange(rows.shape[0], dtype=torch.float64).unsqueeze(-1), fast
        rows = torch.arange(rows.shape[0])
    n_c, n_p = len(choices), pend.shape[0]
    acqf = build_acquisition(
        name, acq_model, objective, X_baseline=inputs[rows[n_c + n_p:]], y_baseline=y_baseline,
        X_pending=inputs[rows[n_c:n_c + n_p]] if n_p else None, beta=beta, seed=seed,
    )
    return acqf, inputs[rows[:n_c]]
