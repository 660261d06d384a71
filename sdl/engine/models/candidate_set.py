"""A GP's joint posterior over a finite candidate set, computed once, as a BoTorch model over row indices.

Why: a pool proposal runs q sequential-greedy steps, each scoring every shortlisted candidate
jointly with the pending points (and, for qLogNEI, the baseline). Through the GP's own
``posterior`` every step rebuilds the joint train + test kernel of every candidate's q-batch. But
all those inputs lie in one finite set (shortlist, pending, baseline): its mean vector and full
posterior covariance, computed once from the cached Cholesky factor
(:meth:`sdl.engine.models.gp.GPPredictor.joint`), hold every joint posterior the steps ask for.
:class:`CandidateSetGP` serves them by gathering: its inputs are float-coded row numbers into
the set (``... x q x 1``), ``posterior`` returns the sub-vector and sub-matrix as a
``GPyTorchPosterior``, so BoTorch's acquisitions (qUCB, qLogEI, qLogNEI with its cached root,
max-variance) run unchanged on it, with the same sampler and base samples: same values as the
GP's own posterior up to float rounding.

:func:`candidate_set_model` decides by the model's type: a single-output ``SingleTaskGP``, bare or
in a :class:`~sdl.engine.models.extensive.RowScaledModel`; None for every other model (ensembles,
multi-task, model lists), which keep their own posterior.
"""

from __future__ import annotations

import logging

import torch
from botorch.models.gpytorch import GPyTorchModel
from botorch.posteriors.gpytorch import GPyTorchPosterior
from botorch.posteriors.posterior import Posterior
from gpytorch.distributions import MultivariateNormal
from linear_operator.operators import DenseLinearOperator

__all__ = ["CandidateSetGP", "candidate_set_model"]

logger = logging.getLogger(__name__)


class CandidateSetGP(GPyTorchModel):
    """Gaussian joint posterior over ``c`` fixed points; ``posterior(X)`` at rows ``X[..., 0]`` of them.

    A ``GPyTorchModel`` because it returns a ``GPyTorchPosterior`` of the latent function, which is
    what BoTorch asks of a model before it caches qLogNEI's baseline root (``supports_cache_root``).

    Args:
        mean: ``[c]`` posterior mean of the set (raw units).
        covar: ``[c, c]`` joint posterior covariance of the set.
    """

    _num_outputs = 1
    mean: torch.Tensor
    covar: torch.Tensor

    def __init__(self, mean: torch.Tensor, covar: torch.Tensor) -> None:
        super().__init__()
        if mean.dim() != 1 or covar.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"CandidateSetGP: mean {tuple(mean.shape)} and covariance {tuple(covar.shape)} "
                             "must be [c] and [c, c]")
        self.register_buffer("mean", mean)
        self.register_buffer("covar", covar)

    def __repr__(self) -> str:
        return f"CandidateSetGP(c={self.mean.shape[0]})"

    @property
    def batch_shape(self) -> torch.Size:
        """No model batch: one set, one output."""
        return torch.Size([])

    def posterior(  # type: ignore[override]
        self,
        X: torch.Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool = False,
        posterior_transform: object | None = None,
    ) -> Posterior:
        """Joint posterior of the latent function at rows ``X[..., 0]`` (``batch x q x 1``) of the set."""
        if observation_noise is not False:
            raise NotImplementedError("CandidateSetGP holds the latent posterior only (no observation noise)")
        idx = X[..., 0].round().long()
        mean = self.mean[idx]
        cov = self.covar[idx.unsqueeze(-1), idx.unsqueeze(-2)]
        # lazily: a dense tensor would be factorised at construction, and a q-batch that repeats a
        # row (a candidate equal to a pending point) is singular; sampling adds jitter as the GP's does
        post = GPyTorchPosterior(MultivariateNormal(mean, DenseLinearOperator(cov)))
        if posterior_transform is not None:
            return posterior_transform(post)  # type: ignore[operator, no-any-return]
        return post


def candidate_set_model(model: object, X: torch.Tensor) -> CandidateSetGP | None:
    """``model``'s joint posterior over the rows of ``X`` (``c x d``, acquisition inputs), or None.

    None when the model is not a single-output ``SingleTaskGP`` (bare or row-scaled): the caller
    then acquires through the model's own posterior.
    """
    from sdl.engine.models.gp import GPPredictor

    try:
        predictor = GPPredictor(model)
    except TypeError:
        return None
    mean, covar = predictor.joint(X)
    return CandidateSetGP(mean, covar)
