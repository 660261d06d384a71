"""The surrogate interface: what the engine asks of a model, and the four models that answer it.

Why one interface: the engine proposes the same way whatever learns the property (a GP on
recipes or descriptors, an ensemble over a crystal pool, nothing at all for the random baseline),
so each model is an object chosen once, when the engine is built, and the engine only calls
:class:`Surrogate` methods. A surrogate is bound to where proposals live (a
:class:`~sdl.engine.space.CandidatePool` or a :class:`~sdl.engine.space.ParameterSpace`) by its constructor.

Acquisition inputs: ``model`` is a BoTorch model over ``inputs()``, one row per pool candidate
(composition, parameter or embedding features, with the atoms-per-cell scale as last column for
extensive targets; a float-coded candidate index for ensembles, see
:mod:`sdl.engine.models.pool_ensemble`), or over the unit-cube encoding of recipes in a parameter space.

Implementations:

* :class:`RandomSurrogate` -- no model (the benchmark baseline); one measurement is enough.
* :class:`GPSurrogate` -- :func:`sdl.engine.models.gp.fit_gp` on parameter or composition features of a
  pool, or on encoded recipes of a space; exact leave-one-out predictions for the metrics.
* :class:`PretrainedSurrogate` -- a head on a frozen backbone's embeddings (GP up to
  :data:`GP_HEAD_MAX_LABELS` labels with ``head: auto``, else a bootstrap MLP ensemble).
* :class:`ScratchEnsembleSurrogate` -- an ensemble trained from scratch on the structures
  (``sdl.engine.models.ensemble.GNNEnsemble`` by default).

Versions: each fit bumps ``n_fits`` and sets ``version = <name>-<n_fits>-<digest>``, the digest of
(name, seed, every observation's key and value); None before the first fit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
import torch

from sdl.engine.models.pretrained import HeadEnsemble, HeldOut
from sdl.exceptions import EngineError

if TYPE_CHECKING:
    from botorch.models.model import Model

    from sdl.engine.distributed import DaskCompute, PoolScores, ShortlistScore
    from sdl.engine.models.backbones import Backbone
    from sdl.engine.models.embedding_store import EmbeddingStore
    from sdl.engine.models.multitask import RelatedData
    from sdl.engine.space import CandidatePool, ParameterSpace

__all__ = [
    "Surrogate", "TrainingData", "RandomSurrogate", "GPSurrogate", "PretrainedSurrogate",
    "ScratchEnsembleSurrogate", "PoolEnsembleFactory", "GP_HEAD_MAX_LABELS", "digest",
]

logger = logging.getLogger(__name__)

GP_HEAD_MAX_LABELS = 1000  # head "auto": exact GP up to here, the head ensemble beyond
HeadKind = Literal["auto", "gp", "mlp"]


def digest(*parts: Any, n: int = 12) -> str:
    """First ``n`` hex digits of the SHA-256 of ``parts`` as sorted-key JSON (reproducible ids)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class TrainingData:
    """Every observation the engine learned from, in order.

    Attributes:
        keys: Candidate key (pool) or canonical recipe key (space) of each observation.
        values: Raw measured value of each observation.
        rows: Pool row of each observation (pool mode), else None.
        X: ``n x d`` encoded recipes (space mode), else None.
        related: Measurements of earlier campaigns (``transfer:``) a GP learns from as related
            tasks (:mod:`sdl.engine.models.multitask`); never observations of this campaign.
    """

    keys: tuple[str, ...]
    values: tuple[float, ...]
    rows: np.ndarray | None = None
    X: torch.Tensor | None = None
    related: RelatedData | None = None

    def __len__(self) -> int:
        return len(self.keys)


class PoolEnsemble(Protocol):
    """An ensemble trained on pool structures: ``fit`` then ``predict_members`` -> ``[M, N]``."""

    def fit(self, structures: Sequence[Any], y: Any, keys: Sequence[str] | None = None) -> Any:
        """Train on ``N`` structures and their (intensive) targets."""
        ...

    def predict_members(
        self, structures: Sequence[Any], keys: Sequence[str] | None = None, batch_size: int = 1024
    ) -> torch.Tensor:
        """Every member's prediction, ``[M, N]``."""
        ...


PoolEnsembleFactory = Callable[[Any, int], PoolEnsemble]


def _default_ensemble_factory(options: Any, seed: int) -> PoolEnsemble:
    from sdl.engine.models.ensemble import GNNEnsemble

    return GNNEnsemble(options, seed=seed)


class Surrogate(ABC):
    """A model the engine fits to observations and proposes from.

    Args:
        seed: Seed of the model's fits (and part of its version).
        pool: The candidate pool it predicts (pool mode).
        space: The parameter space it predicts (space mode, when ``pool`` is None).
        extensive: Labels are per cell: learn them per atom, scale predictions back (pool mode).
        compute: Dask cluster that featurises and scores pool chunks (None: this process).
    """

    name: ClassVar[str]
    """The strategy name written into proposals and records (``gp``, ``gnn-ensemble``, ``random``)."""
    min_observations: ClassVar[int] = 2
    """Measurements needed before the first fit; the engine keeps to its design until then."""
    has_model: ClassVar[bool] = True
    """False for the random baseline: nothing to fit, nothing to acquire with."""

    def __init__(
        self, *, seed: int = 0, pool: CandidatePool | None = None, space: ParameterSpace | None = None,
        extensive: bool = False, compute: DaskCompute | None = None,
    ) -> None:
        self.seed = int(seed)
        self.pool = pool
        self.space = space
        self.extensive = bool(extensive)
        self.compute = compute
        self.n_fits = 0
        self.n_train = 0
        self._version: str | None = None
        self._scale: torch.Tensor | None = None
        self._fit_rows = np.zeros(0, dtype=np.int64)
        self._model: Model | None = None
        self._scored: tuple[tuple[str | None, int], torch.Tensor, torch.Tensor] | None = None
        self._related: RelatedData | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, version={self._version!r})"

    # -- state -------------------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        """``<name>-<fit number>-<digest of the data>`` of the last fit; None before it."""
        return self._version

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` succeeded."""
        return self._version is not None

    @property
    def excluded(self) -> Mapping[str, str]:
        """Candidate key -> why the model cannot use it (never proposed); empty by default."""
        return {}

    @property
    def provides_prior(self) -> bool:
        """True when :meth:`prior` ranks candidates before any label (for a ``prior`` design)."""
        return False

    def prior(self) -> np.ndarray | None:
        """``[N]`` zero-shot prediction per pool row (after :meth:`prepare`), or None."""
        return None

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:  # noqa: B027 - optional hook
        """Do the one-off work before the first proposal (featurise the pool); nothing by default."""

    @property
    def model(self) -> Model:
        """The fitted BoTorch model over :meth:`inputs` rows (pool) or encoded recipes (space).

        Raises:
            EngineError: Not fitted yet.
        """
        if self._model is None:
            raise EngineError(f"model {self.name}: not fitted yet")
        return self._model

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, data: TrainingData) -> None:
        """Fit to every observation so far and set a new :attr:`version`.

        Raises:
            EngineError: Too few usable observations, or a model that cannot fit here.
        """
        self._related = data.related if data.related is not None and len(data.related) else None
        self._fit(data)
        self.n_fits += 1
        pairs = [(k, round(float(v), 12)) for k, v in zip(data.keys, data.values, strict=True)]
        parts: list[Any] = [self.name, self.seed, pairs]
        if self._related is not None:  # a warm-started model is another model than a cold one
            parts.append(self._related.digest_parts())
        self._version = f"{self.name}-{self.n_fits}-{digest(*parts, n=10)}"
        logger.info("fitted %s on %d observations -> %s", self.name, len(data), self._version)

    @abstractmethod
    def _fit(self, data: TrainingData) -> None:
        """Fit the model (set ``_model``, ``n_train`` and, in pool mode, ``_fit_rows``)."""

    def _pool(self) -> CandidatePool:
        if self.pool is None:
            raise EngineError(f"model {self.name!r} needs a candidate pool")
        return self.pool

    def row_scale(self) -> torch.Tensor:
        """``[N]`` divisor of the labels per pool row: atoms per cell for extensive targets, else 1."""
        if self._scale is None:
            pool = self._pool()
            n = len(pool)
            self._scale = (torch.as_tensor(pool.n_atoms(), dtype=torch.float64) if self.extensive
                           else torch.ones(n, dtype=torch.float64))
        return self._scale

    def _pool_labels(self, data: TrainingData) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows and per-row-scaled labels of the usable observations (not :attr:`excluded`)."""
        pool = self._pool()
        assert data.rows is not None
        excluded = self.excluded
        pairs = [(int(i), v) for i, v in zip(data.rows.tolist(), data.values, strict=True)
                 if pool.keys[int(i)] not in excluded]
        if len(pairs) < 2:
            raise EngineError(f"{pool.source}: need 2 measurements of featurisable candidates to fit, "
                              f"have {len(pairs)}")
        idx = torch.as_tensor([i for i, _ in pairs])
        y = torch.tensor([v for _, v in pairs], dtype=torch.float64) / self.row_scale()[idx]
        self.n_train = len(pairs)
        self._fit_rows = idx.numpy()
        return idx, y

    def _fit_gp_on(
        self, X_all: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, kernel: str, priors: str = "lognormal"
    ) -> Any:
        """A GP on pool rows ``idx`` of ``X_all`` (bounds over the whole pool); row-scaled if extensive.

        ``priors``: see :func:`sdl.engine.models.gp.fit_gp` (``gamma`` for recipe parameters).
        """
        from sdl.engine.models.gp import fit_gp

        bounds = torch.stack([X_all.min(dim=0).values, X_all.max(dim=0).values])
        if self._related is not None:
            from sdl.engine.models.multitask import fit_with_related

            gp = fit_with_related(self, X_all[idx], y, X_all, self._related, bounds=bounds, kernel=kernel,
                                  priors=priors)
        else:
            gp = fit_gp(X_all[idx], y, bounds=bounds, kernel=kernel, priors=priors)
        if self.extensive:
            from sdl.engine.models.extensive import RowScaledModel

            self._model = RowScaledModel(gp)
        else:
            self._model = gp
        return gp

    # -- predictions -------------------------------------------------------------------------
    def _features(self) -> torch.Tensor:
        """``[N, d]`` per-row features the (GP) model reads, without the scale column."""
        raise EngineError(f"model {self.name}: has no per-candidate features")

    def features(self) -> torch.Tensor:
        """``[N, d]`` per-row features of the model (what a feasibility classifier learns from).

        Raises:
            EngineError: The model has none (a from-scratch ensemble learns its own).
        """
        return self._features()

    def inputs(self) -> torch.Tensor:
        """``[N, d]`` acquisition inputs, one row per pool candidate (after :meth:`fit`)."""
        from sdl.engine.models.pool_ensemble import PoolEnsembleModel

        pool = self._pool()
        if isinstance(self._model, PoolEnsembleModel):
            return torch.arange(len(pool), dtype=torch.float64).unsqueeze(-1)
        X = self._features()
        return torch.cat([X, self.row_scale().unsqueeze(-1)], dim=1) if self.extensive else X

    def predict(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the raw property at acquisition inputs ``X`` (``n x d``), each ``[n]``."""
        from sdl.engine.models.gp import predict_gp
        from sdl.engine.models.pool_ensemble import PoolEnsembleModel

        model = self.model
        if isinstance(model, PoolEnsembleModel):
            p = model.predictions[:, X[..., 0].round().long()]
            return p.mean(dim=0), p.std(dim=0) if p.shape[0] > 1 else torch.zeros(p.shape[1], dtype=p.dtype)
        return predict_gp(model, X)

    def predict_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the raw property for every pool row, each ``[N]``."""
        scores = self.score_pool(np.zeros(0, dtype=np.int64), _no_score, 0)
        return scores.mean, scores.std

    def forget_scores(self) -> None:
        """Score the pool afresh at the next :meth:`score_pool` (e.g. to time the scoring itself)."""
        self._scored = None

    def score_pool(self, avail: np.ndarray, score: ShortlistScore, k: int) -> PoolScores:
        """Mean and std of every pool row and the ``k`` available rows with the best ``score(mean, std)``.

        A GP scores chunks through its cached Cholesky factor (:class:`~sdl.engine.models.gp.GPPredictor`),
        on :attr:`compute` when set; an ensemble looks its member matrix up. Either way the
        shortlist is a streaming top-k over the chunks (:func:`sdl.engine.distributed.score_pool`).
        Mean and std are kept per model version and pool size: a later proposal of the same model
        (experiments pending, nothing new measured) only cuts the shortlist again.
        """
        from sdl.engine.distributed import DEFAULT_CHUNK, score_pool
        from sdl.engine.models.gp import GPPredictor, predict_gp
        from sdl.engine.models.pool_ensemble import PoolEnsembleModel

        model = self.model
        key = (self._version, len(self._pool()))
        if self._scored is not None and self._scored[0] == key:
            mean, std = self._scored[1], self._scored[2]
            rows = torch.arange(mean.shape[0], dtype=torch.float64).unsqueeze(-1)
            return score_pool(_RowLookup(mean, std), rows, avail, score, k, chunk=mean.shape[0] or 1)
        if isinstance(model, PoolEnsembleModel):
            mean, std = model.mean_std()
            rows = torch.arange(mean.shape[0], dtype=torch.float64).unsqueeze(-1)
            scores = score_pool(_RowLookup(mean, std), rows, avail, score, k, chunk=DEFAULT_CHUNK)
        else:
            chunk = self.compute.chunk if self.compute is not None else DEFAULT_CHUNK
            try:
                predictor: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = GPPredictor(model)
            except TypeError:  # another BoTorch model: its own posterior, chunk by chunk
                predictor = functools.partial(predict_gp, model)
            scores = score_pool(predictor, self.inputs(), avail, score, k, compute=self.compute, chunk=chunk)
        self._scored = (key, scores.mean, scores.std)
        return scores

    def sample(self, X: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """``s x len(X)`` posterior draws at inputs ``X``, reproducible under ``seed``.

        An ensemble gives its ``M`` members in a seeded order (``s = M``); a GP ``n`` joint samples.
        """
        from sdl.engine.models.pool_ensemble import PoolEnsembleModel

        model = self.model
        if isinstance(model, PoolEnsembleModel):
            preds = model.predictions
            order = np.random.default_rng(seed).permutation(preds.shape[0])
            return preds[torch.as_tensor(order)][:, X[..., 0].round().long()]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model.posterior(X).rsample(torch.Size([n])).reshape(n, -1)

    # -- uncertainty quality -----------------------------------------------------------------
    def _held_out(self) -> tuple[HeldOut | None, str, dict[str, float]]:
        """Held-out predictions of the training labels, what they are, and extra metrics."""
        return None, "none", {}

    def uncertainty_metrics(self) -> dict[str, Any]:
        """``sdl.engine.uq`` metrics on held-out predictions of the fitted model's own labels (no refits).

        Raises:
            EngineError: No model fitted yet, or fewer than 4 held-out labels.
        """
        from sdl.engine.uq import uncertainty_metrics

        if not self.fitted:
            raise EngineError("uncertainty_metrics: no model fitted yet")
        held, source, extra = self._held_out()
        if held is None or len(held.y) < 4:
            raise EngineError(f"uncertainty_metrics: need at least 4 held-out labels, have "
                              f"{0 if held is None else len(held.y)}")
        y, mean, std = held.y, held.mean, held.std
        if self.extensive and held.rows is not None:
            s = self.row_scale().numpy()[self._fit_rows[held.rows]]
            y, mean, std = y * s, mean * s, std * s
        out: dict[str, Any] = dict(uncertainty_metrics(y, mean, std))
        out.update(model_version=self._version, strategy=self.name, held_out=source, n_train=self.n_train)
        out.update(extra)
        return out


def _no_score(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return mean


@dataclass(frozen=True)
class _RowLookup:
    """Chunk predictor over precomputed ``[N]`` mean and std (inputs: float-coded row numbers)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = X[..., 0].round().long()
        return self.mean[idx], self.std[idx]


class RandomSurrogate(Surrogate):
    """No model: the engine proposes uniformly among what is left (the benchmark baseline).

    Args:
        seed: Seed of the random picks.
    """

    name = "random"
    min_observations = 1
    has_model = False

    def _fit(self, data: TrainingData) -> None:
        raise EngineError("model random has nothing to fit")

    def uncertainty_metrics(self) -> dict[str, Any]:
        """Empty: there is no model to judge."""
        return {}


class GPSurrogate(Surrogate):
    """A Matérn-5/2 (or RBF) ARD GP on pool features or on encoded recipes of a space.

    Args:
        seed: Seed (part of the version; the GP fit itself is deterministic).
        pool: Candidate pool (pool mode); its parameter columns, else composition descriptors of
            its formulas, are the features.
        space: Parameter space (space mode, when ``pool`` is None).
        kernel: ``matern52`` or ``rbf``.
        priors: ``lognormal`` or ``gamma`` (see :func:`sdl.engine.models.gp.fit_gp`).
        descriptors: Pool features: ``auto`` (parameter columns when the pool has them, else
            composition), ``parameters`` or ``composition``.
        extensive: See :class:`Surrogate`.
        compute: See :class:`Surrogate` (scores pool chunks).

    Raises:
        EngineError: Neither a pool nor a space, or descriptors the pool cannot provide.
    """

    name = "gp"

    def __init__(
        self, *, seed: int = 0, pool: CandidatePool | None = None, space: ParameterSpace | None = None,
        kernel: str = "matern52", descriptors: str = "auto", extensive: bool = False,
        compute: DaskCompute | None = None, priors: str = "lognormal",
    ) -> None:
        super().__init__(seed=seed, pool=pool, space=space, extensive=extensive, compute=compute)
        self.kernel = kernel
        self.priors = priors
        self.descriptors = descriptors
        if pool is None and space is None:
            raise EngineError("model gp needs a candidate pool or a parameter space")
        if pool is not None:
            if descriptors == "parameters" and not pool.parameter_columns:
                raise EngineError(f"model.options.descriptors: 'parameters' but {pool.source} has no parameter_columns")
            if descriptors == "composition" and pool.formula_column is None and pool.structure_column is None:
                raise EngineError(f"model.options.descriptors: 'composition' but {pool.source} has no formula "
                                  "or structure column")
            if descriptors == "auto" and not pool.parameter_columns and not pool.is_crystal:
                raise EngineError(f"model gp: {pool.source} has neither parameter_columns nor formulas/structures")
        self._feature_matrix: torch.Tensor | None = None
        self._gp: Any = None

    def _features(self) -> torch.Tensor:
        if self._feature_matrix is None:
            pool = self._pool()
            if pool.parameter_columns and self.descriptors != "composition":
                self._feature_matrix = pool.parameter_matrix()
            else:
                from sdl.engine.models.composition import composition_features

                self._feature_matrix = torch.as_tensor(composition_features(pool.formulas()))
        return self._feature_matrix

    def _fit(self, data: TrainingData) -> None:
        if self.pool is not None:
            idx, y = self._pool_labels(data)
            self._gp = self._fit_gp_on(self._features(), idx, y, self.kernel, priors=self.priors)
            return
        from sdl.engine.models.gp import fit_gp

        assert self.space is not None and data.X is not None
        y = torch.tensor(data.values, dtype=torch.float64)
        if self._related is not None:
            from sdl.engine.models.multitask import fit_with_related

            self._model = self._gp = fit_with_related(self, data.X, y, None, self._related, bounds=self.space.bounds,
                                                      kernel=self.kernel, priors=self.priors)
        else:
            self._model = self._gp = fit_gp(data.X, y, bounds=self.space.bounds, kernel=self.kernel,
                                            priors=self.priors)
        self.n_train = len(data)

    def _held_out(self) -> tuple[HeldOut | None, str, dict[str, float]]:
        from sdl.engine.models.multitask import leave_one_out

        return leave_one_out(self._gp), "leave-one-out", {}


class PretrainedSurrogate(Surrogate):
    """A head on a frozen pretrained backbone's embeddings (+ its zero-shot prior) over a crystal pool.

    Args:
        pool: Crystal pool (with a structure column).
        seed: Seed of the heads.
        backbone: ``chgnet`` or an import path ``module:Class`` (loaded at :meth:`prepare`).
        loaded_backbone: An already loaded backbone (then ``backbone`` only names it).
        store: Embedding cache (``sdl.engine.models.embedding_store.default_store_path`` when None).
        featurize_workers: Processes for featurising what the store lacks.
        head: ``gp``, ``mlp`` or ``auto`` (GP up to :data:`GP_HEAD_MAX_LABELS` labels).
        use_prior: Append the backbone's prior as an input column (and the MLP's linear term).
        members: Members of the MLP head ensemble (at least 2).
        kernel: Kernel of the GP head.
        extensive: See :class:`Surrogate`.
        compute: See :class:`Surrogate`: featurises what the store lacks and scores the heads.
    """

    name = "gnn-ensemble"

    def __init__(
        self, pool: CandidatePool, *, seed: int = 0, backbone: str = "chgnet", loaded_backbone: Backbone | None = None,
        store: EmbeddingStore | None = None, featurize_workers: int = 1, head: str = "auto", use_prior: bool = True,
        members: int = 5, kernel: str = "matern52", extensive: bool = False, compute: DaskCompute | None = None,
    ) -> None:
        super().__init__(seed=seed, pool=pool, extensive=extensive, compute=compute)
        self.backbone_name = backbone
        self.backbone = loaded_backbone
        self.store = store
        self.featurize_workers = max(1, int(featurize_workers))
        self.head = head
        self.use_prior = bool(use_prior)
        self.members = max(2, int(members))
        self.kernel = kernel
        self._excluded: dict[str, str] = {}
        self._inputs: torch.Tensor | None = None
        self._prior: np.ndarray | None = None
        self.heads: HeadEnsemble | None = None
        self._gp: Any = None

    @property
    def excluded(self) -> dict[str, str]:
        """Candidate key -> why the backbone cannot featurise it (after :meth:`prepare`)."""
        return self._excluded

    @property
    def provides_prior(self) -> bool:
        """True with ``use_prior``: the backbone's zero-shot prediction ranks the pool."""
        return self.use_prior

    def prior(self) -> np.ndarray | None:
        """The backbone's ``[N]`` zero-shot prior (NaN where it failed), after :meth:`prepare`."""
        return self._prior

    @property
    def head_inputs(self) -> torch.Tensor | None:
        """``[N, D(+1)]`` standardised embedding (+ prior) per pool row, after :meth:`prepare`."""
        return self._inputs

    @property
    def head_kind(self) -> str | None:
        """``gp`` or ``mlp``: the head of the last fit (None before it)."""
        if self._model is None:
            return None
        return "mlp" if self.heads is not None else "gp"

    def _head_for(self, n_labels: int) -> str:
        if self.head == "auto":
            return "gp" if n_labels <= GP_HEAD_MAX_LABELS else "mlp"
        return self.head

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Featurise the pool with the backbone (cached); report and exclude what cannot be.

        Raises:
            EngineError: The backbone cannot be loaded, or no candidate could be featurised.
        """
        if self._inputs is not None:
            return
        from sdl.engine.models.backbones import BackboneError, load_backbone
        from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path, featurize_texts
        from sdl.engine.models.pretrained import standardized_inputs

        pool = self._pool()
        try:
            if self.backbone is None:
                self.backbone = load_backbone(self.backbone_name)
        except BackboneError as exc:
            raise EngineError(f"model.options.backbone: {exc}") from exc
        if self.store is None:
            self.store = EmbeddingStore(default_store_path())
        executor = self.compute.executor() if self.compute is not None else None
        chunk = 64 if self.compute is not None else 256  # small tasks spread over every worker
        feats = featurize_texts(self.backbone, pool.structure_texts(), self.store, fmt=pool.structure_format,
                                workers=self.featurize_workers, progress=progress, spec=self.backbone_name,
                                executor=executor, chunk=chunk)
        for i, why in sorted(feats.errors.items()):
            self._excluded[pool.keys[i]] = why
        for key, why in list(self._excluded.items())[:10]:
            logger.warning("%s: candidate %r excluded: %s", pool.source, key, why)
        if len(self._excluded) > 10:
            logger.warning("%s: %d candidates excluded in all (the backbone cannot featurise them)", pool.source,
                        len(self._excluded))
        if len(self._excluded) == len(pool):
            raise EngineError(f"{pool.source}: the {self.backbone.name} backbone could not featurise any candidate")
        self._prior = feats.prior
        if self.extensive:
            featurised = ~np.isin(np.arange(len(pool)), list(feats.errors))
            if np.isfinite(feats.n_atoms[featurised]).all():  # no need to parse the pool again
                self._scale = torch.as_tensor(np.where(featurised, feats.n_atoms, 1.0), dtype=torch.float64)
        self._inputs = standardized_inputs(feats.embeddings, feats.prior if self.use_prior else None)

    def _features(self) -> torch.Tensor:
        self.prepare()
        assert self._inputs is not None
        return self._inputs

    def _fit(self, data: TrainingData) -> None:
        from sdl.engine.models.pool_ensemble import PoolEnsembleModel
        from sdl.engine.models.pretrained import HeadOptions

        self.prepare()
        idx, y = self._pool_labels(data)
        X_all = self._features()
        self.heads = None
        if self._head_for(len(idx)) == "gp":
            self._gp = self._fit_gp_on(X_all, idx, y, self.kernel)
            return
        if self._related is not None:
            logger.warning("transfer: the MLP head (%d labels) learns from this campaign's labels only", len(idx))
        opts = HeadOptions.sized_for(len(idx), members=self.members)
        self.heads = HeadEnsemble(opts, seed=self.seed,
                                  prior_column=X_all.shape[1] - 1 if self.use_prior else None).fit(X_all[idx], y)
        from sdl.engine.distributed import predict_members

        self._model = PoolEnsembleModel(predict_members(self.heads, X_all, self.compute) * self.row_scale())

    def _held_out(self) -> tuple[HeldOut | None, str, dict[str, float]]:
        from sdl.engine.models.multitask import leave_one_out

        if self.heads is not None:
            return self.heads.held_out, "out-of-bag", {"spread_scale": self.heads.spread_scale}
        return leave_one_out(self._gp), "leave-one-out", {}


class ScratchEnsembleSurrogate(Surrogate):
    """An ensemble trained from scratch on the pool's structures, refit on every new label.

    Args:
        pool: Crystal pool (with a structure column).
        seed: Seed of the ensemble.
        options: Ensemble options (``sdl.config.GNNEnsembleOptions`` or any object with its fields).
        factory: ``(options, seed) -> ensemble`` with ``fit(structures, y, keys)`` and
            ``predict_members(structures, keys, batch_size) -> [M, N]``; ``GNNEnsemble`` when None.
        extensive: See :class:`Surrogate`.
    """

    name = "gnn-ensemble"

    def __init__(
        self, pool: CandidatePool, *, seed: int = 0, options: Any = None, factory: PoolEnsembleFactory | None = None,
        extensive: bool = False,
    ) -> None:
        super().__init__(seed=seed, pool=pool, extensive=extensive)
        self.options = options
        self.factory: PoolEnsembleFactory = factory or _default_ensemble_factory
        self.ensemble: PoolEnsemble | None = None

    def _fit(self, data: TrainingData) -> None:
        from sdl.engine.models.pool_ensemble import PoolEnsembleModel

        pool = self._pool()
        idx, y = self._pool_labels(data)
        if self.ensemble is None:
            self.ensemble = self.factory(self.options, self.seed)
        rows = idx.tolist()
        self.ensemble.fit(pool.structures(rows), y.numpy(), [pool.keys[i] for i in rows])
        preds = self.ensemble.predict_members(pool.structures(), pool.keys, batch_size=1024)
        self._model = PoolEnsembleModel(torch.as_tensor(preds, dtype=torch.float64) * self.row_scale())

    def _held_out(self) -> tuple[HeldOut | None, str, dict[str, float]]:
        return getattr(self.ensemble, "held_out", None), "out-of-bag", {}
