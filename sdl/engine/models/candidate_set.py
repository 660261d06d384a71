"""A GP's joint posterior over a finite candidate set, computed once, as a BoTorch model over row indices.

Why: a pool proposal runs q sequential-greedy steps, each scoring every shortlisted candidate
jointly with the pending points (and, for qLogNEI, the baseline). Through the GP's own
``posterior`` every step rebuilds the joint train + test kernel of every candidate's q-batch. But
all those inputs lie in one finite set (shortlist, pending, baseline): its mean vector and
posterior covariance, computed once from the cached Cholesky factor
(:meth:`sdl.engine.models.gp.GPPredictor.joint`; covariance columns as they are asked for), hold
every joint posterior the steps ask for.
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

from sdl.engine.models.gp import JointPosterior

__all__ = ["CandidateSetGP", "candidate_set_model"]

logger = logging.getLogger(__name__)


class CandidateSetGP(GPyTorchModel):
    """Gaussian joint posterior over ``c`` fixed rows; ``posterior(X)`` at rows ``X[..., 0]`` of them.

    A ``GPyTorchModel`` because it returns a ``GPyTorchPosterior`` of the latent function, which is
    what BoTorch asks of a model before it caches qLogNEI's baseline root (``supports_cache_root``).

    Covariance columns are computed when first asked for and kept: in a greedy step the q-batch
    positions that hold the same row across the whole batch (pending, baseline, chosen) get
    their columns; the one position that varies (the candidate) needs only its variance. A
    batch with several varying positions gets the columns of those rows too.

    Args:
        joint: The GP's joint posterior over the set (:meth:`sdl.engine.models.gp.GPPredictor.joint`).
    """

    _num_outputs = 1

    def __init__(self, joint: JointPosterior) -> None:
        super().__init__()
        self.joint = joint
        c = joint.mean.shape[0]
        self._slot = torch.full((c,), -1, dtype=torch.long)  # row -> its column in _cols, -1: none yet
        self._cols = torch.zeros(c, 0, dtype=joint.mean.dtype)

    def __repr__(self) -> str:
        return f"CandidateSetGP(c={self.joint.mean.shape[0]}, columns={self._cols.shape[1]})"

    @property
    def batch_shape(self) -> torch.Size:
        """No model batch: one set, one output."""
        return torch.Size([])

    def _ensure_columns(self, rows: torch.Tensor) -> None:
        new = torch.unique(rows[self._slot[rows] < 0])
        if new.numel():
            self._slot[new] = torch.arange(self._cols.shape[1], self._cols.shape[1] + new.numel())
            self._cols = torch.cat([self._cols, self.joint.columns(new)], dim=-1)

    def covariance(self, idx: torch.Tensor) -> torch.Tensor:
        """``... x q x q`` joint covariance of the rows ``idx`` (``... x q`` long)."""
        q = idx.shape[-1]
        flat = idx.reshape(-1, q)
        shared = (flat == flat[:1]).all(dim=0)
        self._ensure_columns(flat[0, shared])
        if int((~shared).sum()) > 1:
            self._ensure_columns(flat[:, ~shared].reshape(-1))
        a, b = flat.unsqueeze(-1).expand(-1, q, q), flat.unsqueeze(-2).expand(-1, q, q)
        var = self.joint.var[a]
        if self._cols.shape[1] == 0:  # q = 1 with a varying row: the variance is all there is
            return var.reshape(*idx.shape, q)
        sa, sb = self._slot[a], self._slot[b]
        by_b = self._cols[a, sb.clamp_min(0)]
        by_a = self._cols[b, sa.clamp_min(0)]
        cov = torch.where(a == b, var, torch.where(sb >= 0, by_b, torch.where(sa >= 0, by_a, var)))
        return (0.5 * (cov + cov.transpose(-1, -2))).reshape(*idx.shape, q)

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
        with torch.no_grad():
            idx = X[..., 0].round().long()
            mean, cov = self.joint.mean[idx], self.covariance(idx)
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
    return CandidateSetGP(predictor.joint(X))
