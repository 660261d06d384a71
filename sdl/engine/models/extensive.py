"""Extensive targets: a model learns the property per atom, predictions scale with the cell.

Why: an extensive property (energy of the cell, a cell's heat of formation) of two crystals that
differ only in how many formula units their cell holds differs by that ratio, which no per-crystal
descriptor can know; an intensive one (band gap, energy per atom) must *not* be scaled. So the
engine divides extensive labels by the atoms per cell before any model sees them and multiplies
every prediction back (``objective.extensive``, default false): models are always intensive.

For a GP in pool mode the scale travels as the last input column, and :class:`RowScaledModel`
multiplies the joint posterior by it (mean ``s * m``, covariance ``diag(s) K diag(s)``), so every
BoTorch acquisition sees the extensive property. Ensembles scale their member matrix directly.
"""

from __future__ import annotations

import logging

import torch
from botorch.models.model import Model
from botorch.posteriors.gpytorch import GPyTorchPosterior
from gpytorch.distributions import MultivariateNormal
from linear_operator.operators import DiagLinearOperator

__all__ = ["RowScaledModel"]

logger = logging.getLogger(__name__)


class RowScaledModel(Model):
    """``posterior(X) = s(X) * base.posterior(X[..., :-1])`` with ``s = X[..., -1]``.

    Args:
        base: A fitted single-output GP over the inputs without the scale column.
    """

    def __init__(self, base: Model) -> None:
        super().__init__()
        self.base = base
        self._num_outputs = 1

    @property
    def num_outputs(self) -> int:
        """One output (the scaled property)."""
        return 1

    def posterior(  # type: ignore[override]
        self,
        X: torch.Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool = False,
        posterior_transform: object | None = None,
    ) -> GPyTorchPosterior:
        """Joint posterior of the scaled property at ``batch x q x (d + 1)`` inputs."""
        s = X[..., -1]
        post = self.base.posterior(X[..., :-1], observation_noise=observation_noise)
        if not isinstance(post, GPyTorchPosterior):
            raise TypeError(f"RowScaledModel needs a Gaussian base posterior, got {type(post).__name__}")
        mvn = post.distribution
        mean = mvn.mean.reshape(s.shape) * s
        # Lazily diag(s) K diag(s): a dense covariance would be factorised at construction, and it
        # is singular wherever two rows share their inputs (e.g. excluded candidates).
        diag = DiagLinearOperator(s)
        cov = diag @ mvn.lazy_covariance_matrix.reshape(*s.shape, s.shape[-1]) @ diag
        scaled = GPyTorchPosterior(MultivariateNormal(mean, cov))
        if posterior_transform is not None:
            return posterior_transform(scaled)  # type: ignore[operator, no-any-return]
        return scaled
