"""One surrogate per property, seen by BoTorch as one multi-output model (a ``ModelList``).

Why one surrogate per property and not a multi-task model: each property is measured, scaled
(extensive or not) and fitted exactly as a single-objective campaign would fit it, so every
default (the GP, the CHGNet head, ``head: auto``) keeps what it measured; and a property may have
fewer labels than another (a sample whose gap was not measured) without losing the rest.

Inputs in pool mode: the surrogates of one pool may read different rows (a GP on the features plus
the atoms-per-cell column of an extensive target, another without it; an ensemble reads candidate
indices). :class:`PoolIndexedModel` makes each of them a model over the float-coded *candidate
index* (as :mod:`sdl.engine.models.pool_ensemble` does for ensembles), so the ``ModelList`` has one
input that every acquisition can use. In space mode every GP reads the same encoded recipes and
the list holds the GPs themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from botorch.models.model import Model, ModelList
from botorch.posteriors.posterior import Posterior

from sdl.engine.models.surrogate import PretrainedSurrogate, Surrogate, TrainingData, digest
from sdl.exceptions import EngineError

if TYPE_CHECKING:
    from sdl.engine.distributed import PoolScores, ShortlistScore
    from sdl.engine.models.backbones import Backbone

__all__ = ["MultiTrainingData", "MultiOutputSurrogate", "PoolIndexedModel"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiTrainingData(TrainingData):
    """:class:`TrainingData` of the primary property, plus each property's own (its measured rows only).

    Attributes:
        by_property: Property -> the observations that measured it.
    """

    by_property: Mapping[str, TrainingData] = field(default_factory=dict)


class PoolIndexedModel(Model):
    """``posterior(X) = base.posterior(inputs[X[..., 0]])``: a pool model read by candidate index.

    Args:
        base: A fitted single-output model over ``inputs`` rows.
        inputs: ``N x d`` rows the base model reads; None when ``base`` already reads indices.
    """

    def __init__(self, base: Model, inputs: torch.Tensor | None) -> None:
        super().__init__()
        self.base = base
        self.inputs = inputs
        self._num_outputs = 1

    @property
    def num_outputs(self) -> int:
        """One output."""
        return 1

    def posterior(  # type: ignore[override]
        self,
        X: torch.Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool = False,
        posterior_transform: object | None = None,
    ) -> Posterior:
        """Posterior at ``batch x q x 1`` candidate indices."""
        rows = X if self.inputs is None else self.inputs[X[..., 0].round().long()]
        post = self.base.posterior(rows, observation_noise=observation_noise)
        if posterior_transform is not None:
            return posterior_transform(post)  # type: ignore[operator, no-any-return]
        return post


class MultiOutputSurrogate(Surrogate):
    """Several single-property surrogates fitted together; ``model`` is their BoTorch ``ModelList``.

    The first property is the primary one: :meth:`predict`, :meth:`predict_pool`, the prior and the
    uncertainty metrics are its own (what single-value views show).

    Args:
        surrogates: Property -> its surrogate (all of one kind, over one pool or space), primary first.
    """

    min_observations: ClassVar[int] = 2

    def __init__(self, surrogates: Mapping[str, Surrogate]) -> None:
        if not surrogates:
            raise EngineError("MultiOutputSurrogate: needs at least one surrogate")
        self.parts = dict(surrogates)
        self.primary = next(iter(self.parts.values()))
        super().__init__(seed=self.primary.seed, pool=self.primary.pool, space=self.primary.space,
                         extensive=self.primary.extensive)
        self.name = self.primary.name  # type: ignore[misc] # the strategy recorded with each proposal
        self.has_model = self.primary.has_model  # type: ignore[misc]

    @property
    def properties(self) -> list[str]:
        """The modelled properties, primary first."""
        return list(self.parts)

    @property
    def excluded(self) -> Mapping[str, str]:
        """Candidates any part cannot use."""
        out: dict[str, str] = {}
        for part in self.parts.values():
            out.update(part.excluded)
        return out

    @property
    def provides_prior(self) -> bool:
        """The primary's prior ranks the design (``initial_design: prior``)."""
        return self.primary.provides_prior

    def prior(self) -> np.ndarray | None:
        """The primary property's zero-shot prior."""
        return self.primary.prior()

    @property
    def backbone(self) -> Backbone | None:
        """The pretrained backbone the parts share (None without one)."""
        return self.primary.backbone if isinstance(self.primary, PretrainedSurrogate) else None

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Featurise once: the other parts reuse the primary's loaded backbone and embedding cache."""
        self.primary.prepare(progress)
        for part in self.parts.values():
            if part is self.primary:
                continue
            if isinstance(part, PretrainedSurrogate) and isinstance(self.primary, PretrainedSurrogate):
                part.backbone = part.backbone or self.primary.backbone
                part.store = part.store or self.primary.store
            part.prepare()

    def fit(self, data: TrainingData) -> None:
        """Fit every part on its own property's observations; the version digests them all.

        Raises:
            EngineError: A property with fewer than 2 usable observations.
        """
        self._fit(data)
        self.n_fits += 1
        by = data.by_property if isinstance(data, MultiTrainingData) else {}
        pairs = {p: [(k, round(float(v), 12)) for k, v in zip(d.keys, d.values, strict=True)] for p, d in by.items()}
        self._version = f"{self.name}-{self.n_fits}-{digest(self.name, self.seed, pairs, n=10)}"
        logger.info("fitted %s on %s observations -> %s", self.name,
                    {p: len(d) for p, d in by.items()}, self._version)

    def _fit(self, data: TrainingData) -> None:
        if not isinstance(data, MultiTrainingData):
            raise EngineError("MultiOutputSurrogate.fit needs MultiTrainingData (one set per property)")
        for prop, part in self.parts.items():
            sub = data.by_property.get(prop)
            if sub is None or len(sub) < part.min_observations:
                raise EngineError(f"property {prop!r}: {0 if sub is None else len(sub)} measurements, need "
                                  f"{part.min_observations} to fit")
            part.fit(sub)
        self.n_train = self.primary.n_train
        self._fit_rows = self.primary._fit_rows
        models: list[Model] = []
        for part in self.parts.values():
            if self.pool is None:
                models.append(part.model)
                continue
            from sdl.engine.models.pool_ensemble import PoolEnsembleModel

            base = part.model
            models.append(PoolIndexedModel(base, None if isinstance(base, PoolEnsembleModel) else part.inputs()))
        self._model = ModelList(*models)

    def inputs(self) -> torch.Tensor:
        """``[N, 1]`` float-coded candidate indices (what every part of the list reads)."""
        return torch.arange(len(self._pool()), dtype=torch.float64).unsqueeze(-1)

    def predict(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The primary property's mean and std (pool: at candidate indices; space: at recipes)."""
        if self.pool is not None:
            return self.primary.predict(self.primary.inputs()[X[..., 0].round().long()])
        return self.primary.predict(X)

    def predict_all(self, X: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mean and std of every property at ``X`` (as :meth:`predict` reads it), primary first."""
        if self.pool is not None:
            rows = X[..., 0].round().long()
            return {prop: part.predict(part.inputs()[rows]) for prop, part in self.parts.items()}
        return {prop: part.predict(X) for prop, part in self.parts.items()}

    def predict_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The primary property's mean and std for every pool row."""
        return self.primary.predict_pool()

    def score_pool(self, avail: np.ndarray, score: ShortlistScore, k: int) -> PoolScores:
        """The primary property's pool scores and shortlist (the other properties are read per row)."""
        return self.primary.score_pool(avail, score, k)

    def predict_pool_all(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mean and std of every property for every pool row."""
        return {prop: part.predict_pool() for prop, part in self.parts.items()}

    def sample(self, X: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """Draws of the primary property."""
        if self.pool is not None:
            return self.primary.sample(self.primary.inputs()[X[..., 0].round().long()], n, seed)
        return self.primary.sample(X, n, seed)

    def sampler(self, seed: int) -> Any:
        """A ``ListSampler``: each ensemble's members once, a seeded Sobol sampler per GP, of one size."""
        from botorch.models.ensemble import EnsembleModel
        from botorch.sampling.list_sampler import ListSampler
        from botorch.sampling.normal import SobolQMCNormalSampler

        from sdl.engine.models.pool_ensemble import MemberSampler, PoolEnsembleModel

        bases = [part.model for part in self.parts.values()]
        sizes = {b.ensemble_size for b in bases if isinstance(b, PoolEnsembleModel)}
        if len(sizes) > 1:
            raise EngineError(f"the properties' ensembles differ in size {sorted(sizes)}: give them equal members")
        n = sizes.pop() if sizes else 128
        return ListSampler(*[
            MemberSampler(n) if isinstance(b, EnsembleModel)
            else SobolQMCNormalSampler(sample_shape=torch.Size([n]), seed=int(seed) + j)
            for j, b in enumerate(bases)
        ])

    def uncertainty_metrics(self) -> dict[str, Any]:
        """The primary property's metrics (what the campaign's accuracy views show)."""
        return self.primary.uncertainty_metrics()
