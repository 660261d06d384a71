"""An ensemble's predictions over a candidate pool, exposed to BoTorch as an ``EnsembleModel``.

Why indices as inputs: scoring a crystal means building its graph and running M networks, which
is far too slow to do inside an acquisition loop. So the M members predict every candidate once
per round (in memory-bounded chunks, by the ensemble itself) into a matrix ``[M, N]``; the BoTorch
model's input is a candidate index (``batch x q x 1``, float-coded) and ``forward`` is a lookup.
Every BoTorch MC acquisition (qUCB, qLogEI, qLogNEI, ...) then works unchanged on it.

Why :class:`MemberSampler`: BoTorch's ``IndexSampler`` draws members at random (with replacement),
so an acquisition value depends on the draw and on the batch size. Using each member exactly once
makes the MC estimate the exact ensemble average and the whole proposal deterministic.
"""

from __future__ import annotations

import logging

import torch
from botorch.models.ensemble import EnsembleModel
from botorch.posteriors.ensemble import EnsemblePosterior
from botorch.posteriors.posterior import Posterior
from botorch.sampling.base import MCSampler

__all__ = ["MemberSampler", "PoolEnsembleModel"]

logger = logging.getLogger(__name__)


class PoolEnsembleModel(EnsembleModel):
    """Lookup model over a member-prediction matrix.

    Args:
        predictions: ``M x N`` member predictions for the N pool candidates (raw property units).
    """

    predictions: torch.Tensor  # a registered buffer (moves with the model)

    def __init__(self, predictions: torch.Tensor) -> None:
        super().__init__()
        if predictions.ndim != 2 or predictions.shape[0] < 1 or predictions.shape[1] < 1:
            raise ValueError(f"PoolEnsembleModel: predictions must be M x N, got shape {tuple(predictions.shape)}")
        if not torch.isfinite(predictions).all():
            raise ValueError("PoolEnsembleModel: predictions contain NaN or infinite values")
        self.register_buffer("predictions", predictions.to(torch.float64))
        self._num_outputs = 1

    @property
    def ensemble_size(self) -> int:
        """M, the number of members."""
        return int(self.predictions.shape[0])

    @property
    def num_candidates(self) -> int:
        """N, the number of pool candidates."""
        return int(self.predictions.shape[1])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Look up member predictions.

        Args:
            X: ``batch_shape x q x 1`` candidate indices (float-coded integers).

        Returns:
            ``batch_shape x M x q x 1`` member predictions.
        """
        if X.shape[-1] != 1:
            raise ValueError(f"PoolEnsembleModel: inputs are candidate indices, last dim must be 1, got {X.shape=}")
        idx = X[..., 0].round().long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_candidates):
            raise IndexError(f"PoolEnsembleModel: index out of range [0, {self.num_candidates})")
        values = self.predictions[:, idx]  # M x batch x q
        return values.movedim(0, -2).unsqueeze(-1)

    def mean_std(self, chunk: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean and (unbiased) std over members for every candidate, each ``[N]``."""
        p = self.predictions
        std = p.std(dim=0) if p.shape[0] > 1 else torch.zeros(p.shape[1], dtype=p.dtype)
        return p.mean(dim=0), std


class MemberSampler(MCSampler):
    """Deterministic sampler for ``EnsemblePosterior``: sample ``s`` is member ``s`` (each used once).

    Args:
        ensemble_size: M; the sample shape is ``[M]``.
    """

    def __init__(self, ensemble_size: int) -> None:
        super().__init__(sample_shape=torch.Size([int(ensemble_size)]), seed=0)

    def forward(self, posterior: Posterior) -> torch.Tensor:
        """All members' values: ``M x batch_shape x q x m``.

        Raises:
            TypeError: Not an ``EnsemblePosterior``.
        """
        if not isinstance(posterior, EnsemblePosterior):
            raise TypeError(f"MemberSampler needs an EnsemblePosterior, got {type(posterior).__name__}")
        m = posterior.ensemble_size
        if m != self.sample_shape[0]:
            raise ValueError(f"MemberSampler built for {self.sample_shape[0]} members, posterior has {m}")
        batch = posterior.batch_shape
        base = torch.arange(m, device=posterior.device).reshape(m, *([1] * len(batch))).expand(m, *batch)
        return posterior.rsample_from_base_samples(sample_shape=self.sample_shape, base_samples=base)

    def _update_base_samples(self, posterior: Posterior, base_sampler: MCSampler) -> None:
        """Nothing to update: the base samples are fixed (needed by cached-Cholesky acquisitions)."""
