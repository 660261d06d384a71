"""The active-learning engine: ``observe()`` measurements, ``propose()`` the next q experiments.

Plain Python (no Prefect, no instruments), so scripts, notebooks, the Prefect flow and the pool
replay benchmark all drive the same object. One round is::

    engine.observe([Observation(key, params, value), ...])
    batch = engine.propose(q=4, pending=[...proposed/running keys...], exclude=[...failed keys...])

Two objects are chosen once, when the engine is built, and do the work of every round:

* a surrogate (:class:`sdl.engine.models.surrogate.Surrogate`), from ``model.name`` by
  :func:`build_surrogate` -- the one place a model name is read:

  * ``random`` -- no model; uniform over what is left (the benchmark baseline).
  * ``gp`` -- :func:`sdl.engine.models.gp.fit_gp` on unit-cube recipes (space or parameter pool) or on
    composition descriptors (crystal pool); continuous mode optimises the acquisition in the box
    and rounds integers / categoricals; pool mode scores only table rows.
  * ``gnn-ensemble`` -- crystal pools. With ``options.backbone`` a pretrained model (``chgnet``,
    the default) embeds every candidate once (:mod:`sdl.engine.models.embedding_store`); a head on the
    frozen embedding and the backbone's zero-shot prior learns the property: an ensemble of small
    networks with a recalibrated spread (``head: mlp``) or a GP (``head: gp``); ``head: auto``
    (default) takes the GP up to 1,000 labels, where it measured better, and the ensemble beyond.
    ``backbone: scratch`` trains ``sdl.engine.models.ensemble.GNNEnsemble`` (CGCNN-style) from scratch.

* a selection rule (:class:`Selection`), from ``acquisition.function``: a BoTorch MC acquisition
  (qUCB, qLogEI, qLogNEI, max-variance) maximised greedily over the pool or in the box, Thompson
  sampling, or uniform picks for the random baseline.

Extensive targets (``objective.extensive``) are learned per atom and scaled back per candidate
(:mod:`sdl.engine.models.extensive`); uncertainty metrics come from out-of-bag or leave-one-out
predictions of the fitted model, never from refits.

Rules every strategy obeys: exactly ``initial_design.size`` experiments come from a design that
depends only on the seed (a seeded permutation of the pool, or scrambled Sobol / uniform points of
the space), so every strategy starts from the same points (see :meth:`Engine.propose` for how
experiments in flight count); a proposal never repeats a measured, pending or excluded key;
q-batches are distinct; pending experiments enter the acquisition as ``X_pending``, excluded ones
(failed, abandoned) only leave the candidates; the same state (seed, observations, pending,
exclude) gives the same proposals; ``EngineError("pool exhausted ...")`` only when nothing is left.

Failed syntheses (:meth:`Engine.observe_failures`) never reach the objective model; once there is
one, a GP classifier on the surrogate's features (:mod:`sdl.engine.feasibility`) weights the
acquisition by P(success) (``acquisition.feasibility``: ``auto``, the default, ``on`` or ``off``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from sdl.engine.feasibility import FeasibilityMode, GPClassifier
from sdl.engine.models.surrogate import (
    GP_HEAD_MAX_LABELS,
    GPSurrogate,
    PoolEnsemble,
    PretrainedSurrogate,
    RandomSurrogate,
    ScratchEnsembleSurrogate,
    Surrogate,
    TrainingData,
    digest,
)
from sdl.engine.objectives import Objective
from sdl.engine.space import CandidatePool, ParameterSpace
from sdl.exceptions import EngineError
from sdl.steps import step

if TYPE_CHECKING:
    from botorch.acquisition import AcquisitionFunction

    from sdl.engine.distributed import DaskCompute
    from sdl.engine.models.backbones import Backbone
    from sdl.engine.models.embedding_store import EmbeddingStore
    from sdl.engine.models.multitask import RelatedData
    from sdl.engine.models.pretrained import HeadEnsemble

__all__ = [
    "STRATEGIES", "Engine", "Observation", "Proposal", "Selection", "AcquisitionSelection", "MaxVarianceSelection",
    "ThompsonSelection", "RandomSelection", "PoolRound", "SpaceRound", "build_surrogate", "build_selection",
    "GP_HEAD_MAX_LABELS",
]

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "gp", "gnn-ensemble")
ACQUISITION_FUNCTIONS = ("qucb", "qlogei", "qlognei", "max-variance", "thompson")
DESIGN = "initial-design"


@dataclass(frozen=True)
class Observation:
    """One measurement of the objective's property.

    Args:
        key: Candidate id (pool) or ``ParameterSpace.key_of`` string (space).
        params: The recipe (needed in space mode when the key is not canonical).
        value: Raw measured value of the property.
        values: The other properties measured on the same sample (several objectives, constraints).
    """

    key: str
    params: Mapping[str, Any] = field(default_factory=dict)
    value: float = math.nan
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Proposal:
    """One proposed experiment.

    Attributes:
        key: Candidate id (pool) or canonical recipe string (space).
        params: The recipe (pool: parameter columns and formula, when known).
        acquisition_value: The value it won with (None for design / random picks).
        predicted_mean: Model mean of the raw property (None without a model).
        predicted_std: Model std of the raw property (None without a model).
        model_version: Version of the model that proposed it (``design-s<seed>`` before any model,
            ``random-s<seed>`` for random picks).
        batch_id: Same for every proposal of one ``propose()`` call; reproducible.
        strategy: ``initial-design``, ``random``, ``gp`` or ``gnn-ensemble``.
        p_success: The feasibility classifier's P(success) when it weighted the acquisition
            (:mod:`sdl.engine.feasibility`), else None.
        predictions: Several objectives: ``property -> (mean, std)`` of every modelled property
            (the first is ``predicted_mean`` / ``predicted_std``), else None.
    """

    key: str
    params: dict[str, Any]
    acquisition_value: float | None
    predicted_mean: float | None
    predicted_std: float | None
    model_version: str
    batch_id: str
    strategy: str
    p_success: float | None = None
    predictions: Mapping[str, tuple[float, float]] | None = None


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


# -- selection rules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolRound:
    """What a selection rule sees in pool mode.

    Attributes:
        avail: Pool rows that may be proposed (not measured, pending or excluded).
        q: Batch size.
        seed: Seed of this call (from the engine seed, the observations and the pending keys).
        objective: Utility of raw values.
        surrogate: The fitted surrogate (unfitted for rules that need no model).
        mean: ``[N]`` posterior mean per pool row (None without a model).
        std: ``[N]`` posterior std per pool row (None without a model).
        baseline_rows: Measured pool rows (qLogNEI's baseline).
        y: Raw measured values (qLogEI's incumbent).
        pending_rows: Pool rows of pending experiments (``X_pending``); never excluded ones.
        prefilter_k: Rows kept by the cheap optimistic score before an acquisition.
        chunk_size: Rows per acquisition call.
        shortlist_rows: The shortlist already streamed out of the scored chunks (None: cut it
            from ``mean`` / ``std`` here).
        log_p_success: ``[N]`` log P(success) per pool row from the feasibility classifier
            (None: no failure yet, or feasibility off); the rule weighs its values with it.
    """

    avail: np.ndarray
    q: int
    seed: int
    objective: Objective
    surrogate: Surrogate
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    baseline_rows: list[int] = field(default_factory=list)
    y: torch.Tensor | None = None
    pending_rows: list[int] = field(default_factory=list)
    prefilter_k: int = 2048
    chunk_size: int = 256
    shortlist_rows: np.ndarray | None = None
    log_p_success: torch.Tensor | None = None


@dataclass(frozen=True)
class SpaceRound:
    """What a selection rule sees in space mode.

    Attributes:
        space: The parameter space.
        taken: Keys that must not be returned (measured, pending, excluded).
        q: Batch size.
        seed: Seed of this call.
        objective: Utility of raw values.
        surrogate: The fitted surrogate (unfitted for rules that need no model).
        X_baseline: ``n x d`` encoded measured recipes.
        y: Raw measured values.
        X_pending: ``m x d`` encoded pending recipes (never excluded ones), or None.
    """

    space: ParameterSpace
    taken: set[str]
    q: int
    seed: int
    objective: Objective
    surrogate: Surrogate
    X_baseline: torch.Tensor | None = None
    y: torch.Tensor | None = None
    X_pending: torch.Tensor | None = None


class Selection(ABC):
    """How a q-batch is chosen once the design is over.

    Args:
        beta: Width of the optimistic pre-filter score (and qUCB's exploration weight).
    """

    name: ClassVar[str] = "selection"
    """The ``acquisition.function`` it stands for (records and logs)."""
    needs_model: ClassVar[bool] = True
    """False when the rule picks without a fitted model (random)."""

    def __init__(self, beta: float = 2.0) -> None:
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta})"

    def shortlist_score(self, objective: Objective, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Cheap score that cuts large pools before the real rule (optimistic utility)."""
        return objective.optimistic(mean, std, self.beta)

    def shortlist(self, r: PoolRound) -> np.ndarray:
        """The ``prefilter_k`` available rows with the best :meth:`shortlist_score` (all when fewer)."""
        if r.shortlist_rows is not None and r.log_p_success is None:  # streamed, and no feasibility to weigh in
            return r.shortlist_rows
        if r.avail.size <= r.prefilter_k:
            return r.avail
        assert r.mean is not None and r.std is not None
        a = torch.as_tensor(r.avail)
        score = self.shortlist_score(r.objective, r.mean[a], r.std[a])
        if r.log_p_success is not None:
            from sdl.engine.feasibility import weigh

            score = weigh(score, r.log_p_success[a], "shifted", floor=float(score.min()))
        best = top_k_indices(score, r.prefilter_k)
        short: np.ndarray = r.avail[best]
        return short

    @abstractmethod
    def pick_rows(self, r: PoolRound) -> tuple[list[int], list[float] | None]:
        """Up to ``q`` distinct pool rows and the value each won with (None: no values)."""

    @abstractmethod
    def pick_recipes(self, r: SpaceRound) -> tuple[list[dict[str, Any]], list[float | None] | None]:
        """Up to ``q`` distinct recipes not in ``taken`` and their values (None: no values)."""


def box_recipes(r: SpaceRound, acqf: AcquisitionFunction) -> tuple[list[dict[str, Any]], list[float | None]]:
    """``optimize_acqf`` of ``acqf`` in the space's box, decoded and rounded to recipes; collisions
    with taken or repeated recipes replaced by seeded random ones (:func:`_distinct_fill`)."""
    from sdl.engine.optim import optimize_box

    X, vals = optimize_box(acqf, r.space.bounds, r.q, seed=r.seed)
    recipes = r.space.decode(X)
    values = vals.tolist() if vals.numel() == len(recipes) else [float(vals.max())] * len(recipes)
    return _distinct_fill(r, recipes, values)


def _distinct_fill(
    r: SpaceRound, recipes: Sequence[dict[str, Any]], values: Sequence[float]
) -> tuple[list[dict[str, Any]], list[float | None]]:
    """Drop recipes that rounded onto taken or repeated keys; fill up with seeded random recipes."""
    kept: list[dict[str, Any]] = []
    kept_vals: list[float | None] = []
    seen = set(r.taken)
    for rec, v in zip(recipes, values, strict=False):
        k = r.space.key_of(rec)
        if k not in seen:
            seen.add(k)
            kept.append(rec)
            kept_vals.append(v)
    if len(kept) < r.q:  # rounding collided with taken recipes: fill with seeded random recipes
        fill = _fresh(r.space, r.space.sample(8 * r.q + len(seen), r.seed + 1, "random"), seen, r.q - len(kept))
        kept += fill
        kept_vals += [None] * len(fill)
    return kept, kept_vals


def _fresh(space: ParameterSpace, recipes: Iterable[dict[str, Any]], taken: set[str], q: int) -> list[dict[str, Any]]:
    """The first ``q`` recipes whose keys are neither taken nor repeated."""
    out: list[dict[str, Any]] = []
    seen = set(taken)
    if q <= 0:
        return out
    for rec in recipes:
        k = space.key_of(rec)
        if k not in seen:
            seen.add(k)
            out.append(rec)
            if len(out) == q:
                break
    return out


class AcquisitionSelection(Selection):
    """A BoTorch MC acquisition (:func:`sdl.engine.acquisition.build_acquisition`), maximised greedily.

    Pool: sequential greedy over the shortlisted rows (:func:`sdl.engine.optim.greedy_select`); space:
    ``optimize_acqf`` in the encoded box, then rounding onto valid recipes.

    Args:
        function: ``qucb``, ``qlogei``, ``qlognei`` or ``max-variance``.
        beta: qUCB's exploration weight and the pre-filter's width.
    """

    def __init__(self, function: str, beta: float = 2.0) -> None:
        super().__init__(beta)
        self.function = function

    @property
    def name(self) -> str:  # type: ignore[override]
        """The BoTorch acquisition's name (``qucb``, ``qlogei``, ...)."""
        return self.function

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.function!r}, beta={self.beta})"

    def pick_rows(self, r: PoolRound) -> tuple[list[int], list[float] | None]:
        """Greedy q-batch over the shortlist, pending rows joined as ``X_pending``."""
        from sdl.engine.acquisition import pool_acquisition
        from sdl.engine.optim import greedy_select

        assert r.y is not None
        short = self.shortlist(r)
        acqf, choices = pool_acquisition(
            self.function, r.surrogate.model, r.objective, r.surrogate.inputs(), short,
            baseline_rows=r.baseline_rows, y_baseline=r.y, pending_rows=r.pending_rows, beta=self.beta, seed=r.seed,
        )
        transform = None
        if r.log_p_success is not None:
            from sdl.engine.feasibility import weigh, weigh_kind

            log_p = r.log_p_success[torch.as_tensor(short)]
            kind = weigh_kind(self.function)
            floor = float(r.objective.utility(r.y).max())

            def transform(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                return weigh(values, log_p[rows], kind, floor)

        rows, values = greedy_select(acqf, choices, r.q, chunk=r.chunk_size, transform=transform)
        return short[rows].tolist(), values

    def pick_recipes(self, r: SpaceRound) -> tuple[list[dict[str, Any]], list[float | None] | None]:
        """``optimize_acqf`` in the box, rounded; collisions replaced by seeded random recipes."""
        from sdl.engine.acquisition import build_acquisition

        assert r.X_baseline is not None and r.y is not None
        acqf = build_acquisition(self.function, r.surrogate.model, r.objective, X_baseline=r.X_baseline,
                                 y_baseline=r.y, X_pending=r.X_pending, beta=self.beta, seed=r.seed)
        return box_recipes(r, acqf)


class MaxVarianceSelection(AcquisitionSelection):
    """Pure exploration (:class:`sdl.engine.acquisition.qMaxVariance`); the pool pre-filter keeps the widest stds.

    Args:
        beta: Unused by the acquisition; kept for a uniform signature.
    """

    def __init__(self, beta: float = 2.0) -> None:
        super().__init__("max-variance", beta)

    def shortlist_score(self, objective: Objective, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The posterior std: exploration does not care about the utility."""
        return std


class ThompsonSelection(Selection):
    """Thompson sampling: slot ``i`` takes the best utility of posterior draw ``i``.

    See :func:`sdl.engine.optim.thompson_select`.

    Args:
        beta: Width of the pool pre-filter.
        candidates: Scrambled-Sobol recipes drawn per round in space mode.
    """

    name = "thompson"

    def __init__(self, beta: float = 2.0, candidates: int = 1024) -> None:
        super().__init__(beta)
        self.candidates = int(candidates)

    def pick_rows(self, r: PoolRound) -> tuple[list[int], list[float] | None]:
        """Draws over the shortlist (every ensemble member once, in a seeded order; GP joint samples)."""
        from sdl.engine.optim import thompson_select

        short = self.shortlist(r)
        draw = r.surrogate.sample(r.surrogate.inputs()[torch.as_tensor(short)], r.q, r.seed)
        rows, values = thompson_select(draw, r.objective, r.q)
        return short[rows].tolist(), values

    def pick_recipes(self, r: SpaceRound) -> tuple[list[dict[str, Any]], list[float | None] | None]:
        """Draws over a seeded Sobol set of recipes, taken ones left out."""
        from sdl.engine.optim import thompson_select

        cand = r.space.sample(self.candidates, r.seed, "sobol")
        draw = r.surrogate.sample(r.space.encode(cand), r.q, r.seed)
        free = [i for i, c in enumerate(cand) if r.space.key_of(c) not in r.taken]
        rows, values = thompson_select(draw[:, free], r.objective, r.q)
        return _distinct_fill(r, [cand[free[i]] for i in rows], values)


class RandomSelection(Selection):
    """Uniform picks among what is left, seeded by ``(engine seed, round seed)``; no model.

    Args:
        seed: The engine's seed.
    """

    name = "random"
    needs_model = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

    def pick_rows(self, r: PoolRound) -> tuple[list[int], list[float] | None]:
        """:func:`sdl.engine.models.random.random_choice` over the available rows."""
        from sdl.engine.models.random import random_choice

        return random_choice(r.avail, r.q, self.seed, r.seed), None

    def pick_recipes(self, r: SpaceRound) -> tuple[list[dict[str, Any]], list[float | None] | None]:
        """Seeded uniform recipes, taken ones skipped."""
        return _fresh(r.space, r.space.sample(4 * r.q + len(r.taken), r.seed, "random"), r.taken, r.q), None


def _feasibility_mode(value: Any) -> FeasibilityMode:
    mode = str(value or "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise EngineError(f"acquisition.feasibility: unknown {mode!r}; known: auto, on, off")
    return mode  # type: ignore[return-value]


def build_selection(acquisition: Any, surrogate: Surrogate, seed: int) -> Selection:
    """The selection rule for ``acquisition.function`` (random picks when the surrogate has no model).

    Raises:
        EngineError: Unknown function name.
    """
    if isinstance(acquisition, Selection):
        return acquisition
    name = str(_get(acquisition, "function", "qlognei")).lower()
    beta = float(_get(acquisition, "beta", 2.0) or 2.0)
    if name not in ACQUISITION_FUNCTIONS:
        raise EngineError(f"acquisition.function: unknown {name!r}; known: {', '.join(ACQUISITION_FUNCTIONS)}")
    if not surrogate.has_model:
        return RandomSelection(seed)
    if name == "thompson":
        return ThompsonSelection(beta)
    if name == "max-variance":
        return MaxVarianceSelection(beta)
    return AcquisitionSelection(name, beta)


def build_surrogate(
    model: Any,
    *,
    seed: int,
    pool: CandidatePool | None,
    space: ParameterSpace | None,
    extensive: bool = False,
    ensemble_factory: Callable[[Any, int], PoolEnsemble] | None = None,
    backbone: Backbone | None = None,
    embedding_store: EmbeddingStore | None = None,
    featurize_workers: int = 1,
    compute: DaskCompute | None = None,
) -> Surrogate:
    """The surrogate for a ``model:`` config (``name`` + ``options``): the only place a model name is read.

    Args:
        model: ``sdl.config`` model config (or any object / dict with ``name`` and ``options``, or
            a bare name); a :class:`~sdl.engine.models.surrogate.Surrogate` is returned as it is.
        seed: Seed of the model.
        pool: Candidate pool (pool mode).
        space: Parameter space (space mode, used when ``pool`` is None).
        extensive: ``objective.extensive``.
        ensemble_factory: Ensemble for ``gnn-ensemble`` with ``backbone: scratch``.
        backbone: Loaded pretrained backbone for ``gnn-ensemble`` (else loaded from the option).
        embedding_store: Embedding cache of a pretrained backbone.
        featurize_workers: Featurising processes of a pretrained backbone.
        compute: Dask cluster for featurising and scoring pool chunks (None: this process).

    Raises:
        EngineError: Unknown name, or a model that cannot work on this pool / space.
    """
    if isinstance(model, Surrogate):
        return model
    name = str(_get(model, "name", model if isinstance(model, str) else "random"))
    options = _get(model, "options", None)
    if name == "random":
        return RandomSurrogate(seed=seed, pool=pool, space=space)
    if name == "gp":
        return GPSurrogate(seed=seed, pool=pool, space=space, extensive=extensive,
                           kernel=str(_get(options, "kernel", "matern52") or "matern52"),
                           descriptors=str(_get(options, "descriptors", "auto") or "auto"),
                           priors=str(_get(options, "priors", "lognormal") or "lognormal"), compute=compute)
    if name == "gnn-ensemble":
        if pool is None or pool.structure_column is None:
            raise EngineError("model gnn-ensemble needs a candidate pool with a structure column")
        backbone_name = str(_get(options, "backbone", "chgnet") or "chgnet")
        if backbone_name == "scratch":
            return ScratchEnsembleSurrogate(pool, seed=seed, options=options, factory=ensemble_factory,
                                            extensive=extensive)
        return PretrainedSurrogate(
            pool, seed=seed, backbone=backbone_name, loaded_backbone=backbone, store=embedding_store,
            featurize_workers=featurize_workers, head=str(_get(options, "head", "auto") or "auto"),
            use_prior=bool(_get(options, "use_prior", True)), members=int(_get(options, "members", 5) or 5),
            kernel=str(_get(options, "kernel", "matern52") or "matern52"), extensive=extensive, compute=compute,
        )
    raise EngineError(f"model.name: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")


# -- the engine ---------------------------------------------------------------------------------
class Engine:
    """Propose experiments and learn from measurements.

    Args:
        objective: ``sdl.config.ObjectiveSpec`` / :class:`sdl.engine.objectives.Objective` (goal, target_range).
        model: Config with ``name`` (``random``, ``gp``, ``gnn-ensemble``) and ``options``, mapped
            by :func:`build_surrogate`; or a :class:`~sdl.engine.models.surrogate.Surrogate`.
        acquisition: Config with ``function`` (qlogei, qlognei, qucb, max-variance, thompson),
            ``batch_size`` and ``beta``, mapped by :func:`build_selection`; or a :class:`Selection`
            (then ``propose`` takes ``q`` or proposes one at a time).
        seed: Seed of the design, the samplers and the models.
        pool: Candidate pool (pool mode); takes precedence over ``space``.
        space: Parameter space (continuous mode).
        initial_design: Config with ``strategy`` (``random`` / ``sobol`` / ``prior``) and ``size``.
        retrain_every: Refit the model after this many new measurements.
        ensemble_factory: ``(options, seed) -> ensemble`` with ``fit(structures, y, keys)`` and
            ``predict_members(structures, keys, batch_size) -> Tensor[M, N]``, for ``gnn-ensemble``
            with ``backbone: scratch``; defaults to ``sdl.engine.models.ensemble.GNNEnsemble``.
        prefilter_k: Candidates kept by the cheap optimistic score before the acquisition.
        chunk_size: Rows per acquisition call (bounds memory). Small on purpose: each call holds
            ``MC samples x rows x (1 + pending)`` values, and kept cache-sized they made a q = 8
            greedy pick over 2,048 rows about 3x faster than 4,096 rows per call.
        backbone: Pretrained backbone for ``gnn-ensemble`` (loaded from ``options.backbone`` when
            None and the option is not ``scratch``).
        embedding_store: Where embeddings are cached (``sdl.engine.models.embedding_store.default_store_path``
            when None).
        featurize_workers: Processes for featurising candidates the store lacks.
        compute: Dask cluster that featurises and scores pool chunks
            (:class:`sdl.engine.distributed.DaskCompute`; None: this process). Not owned: its
            maker closes it.
    """

    def __init__(
        self,
        objective: Any,
        model: Any,
        acquisition: Any,
        seed: int = 0,
        pool: CandidatePool | None = None,
        space: ParameterSpace | None = None,
        initial_design: Any = None,
        *,
        retrain_every: int = 1,
        ensemble_factory: Callable[[Any, int], Any] | None = None,
        prefilter_k: int = 2048,
        chunk_size: int = 256,
        backbone: Backbone | None = None,
        embedding_store: EmbeddingStore | None = None,
        featurize_workers: int = 1,
        compute: DaskCompute | None = None,
    ) -> None:
        self.objective = Objective.from_any(objective)
        self.seed = int(seed)
        if pool is None and space is None:
            raise EngineError("Engine needs a candidate pool or a parameter space")
        self.pool = pool
        self.space = space if pool is None else (pool.space or space)
        self.extensive = bool(_get(objective, "extensive", False))
        if self.extensive and (pool is None or not pool.is_crystal):
            raise EngineError("objective.extensive: only crystal pools have cells to scale by")
        self.model_options = _get(model, "options", None)
        self._model_spec = model
        self._acquisition_spec = acquisition
        self._ensemble_factory = ensemble_factory
        self._embedding_store = embedding_store
        self._featurize_workers = max(1, int(featurize_workers))
        self.compute = compute
        self.surrogate: Surrogate = build_surrogate(
            model, seed=self.seed, pool=pool, space=self.space if pool is None else None, extensive=self.extensive,
            ensemble_factory=ensemble_factory, backbone=backbone, embedding_store=embedding_store,
            featurize_workers=max(1, int(featurize_workers)), compute=compute,
        )
        self.strategy = self.surrogate.name
        self.acquisition_name = (acquisition.name if isinstance(acquisition, Selection)
                                 else str(_get(acquisition, "function", "qlognei")).lower())
        self.batch_size = int(_get(acquisition, "batch_size", 1) or 1)
        self.beta = float(_get(acquisition, "beta", 2.0) or 2.0)
        self.selection: Selection = build_selection(acquisition, self.surrogate, self.seed)
        self.feasibility: FeasibilityMode = _feasibility_mode(_get(acquisition, "feasibility", "auto"))
        self.feasibility_model: GPClassifier | None = None
        self._failed: list[str] = []
        self._failed_index: list[int] = []  # pool row of each failure
        self._feasibility_at: tuple[int, int] = (-1, -1)
        self._feasibility_p: torch.Tensor | None = None
        self.design_size = int(_get(initial_design, "size", 8) or 0)
        self.design_method = str(_get(initial_design, "strategy", "sobol") or "sobol")
        self.retrain_every = max(1, int(retrain_every))
        self.prefilter_k = int(prefilter_k)
        self.chunk_size = int(chunk_size)
        self._obs: list[Observation] = []
        self._obs_index: list[int] = []  # pool row of each observation (pool mode)
        self._measured: set[str] = set()
        self._related: RelatedData | None = None  # earlier campaigns' measurements (transfer:), no observations
        self._related_taken: set[str] = set()  # keys they measured, never proposed (transfer.skip_measured)
        self._n_at_fit = -1
        self._design_order: np.ndarray | None = None
        if self.design_method == "prior" and not self.surrogate.provides_prior:
            raise EngineError("initial_design.strategy: 'prior' needs model gnn-ensemble with a pretrained "
                              "backbone and use_prior")
        if self.design_method == "prior" and self.objective.goal == "target":
            raise EngineError("initial_design.strategy: 'prior' ranks by the backbone's prior; it needs goal "
                              "maximize or minimize, not target")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_campaign(cls, cfg: Any, **kwargs: Any) -> Engine:
        """Engine for a ``sdl.config.CampaignConfig`` (search space, objective, model, acquisition).

        ``cfg.model`` becomes a surrogate by :func:`build_surrogate`, ``cfg.acquisition`` a
        selection rule by :func:`build_selection`; ``cfg.compute`` (or ``SDL_DASK_ADDRESS``, which
        wins) a Dask cluster, unless ``compute`` is passed. A campaign with ``objectives:`` gets a
        :class:`sdl.engine.multi_objective.MultiObjectiveEngine`.
        """
        if cls is Engine and _get(cfg, "fidelities") is not None:  # never run cheap sources as experiments
            raise EngineError("fidelities: this engine cannot run computed sources; use "
                              "sdl.engine.multifidelity.MultiFidelityEngine (sdl benchmark runs it)")
        if _get(cfg, "objectives") is not None and cls is Engine:
            from sdl.engine.multi_objective import MultiObjectiveEngine

            return MultiObjectiveEngine.from_campaign(cfg, **kwargs)
        if "compute" not in kwargs:
            from sdl.engine.distributed import compute_from_config
            from sdl.settings import settings

            kwargs["compute"] = compute_from_config(_get(cfg, "compute"), settings().dask_address)
        ss = cfg.search_space
        space = ParameterSpace.from_config(ss.parameters) if _get(ss, "parameters") else None
        pool = CandidatePool.from_config(ss.candidates, space=space) if _get(ss, "candidates") else None
        return cls(
            objective=cfg.objective, model=cfg.model, acquisition=cfg.acquisition, seed=cfg.seed, pool=pool,
            space=space, initial_design=cfg.initial_design,
            retrain_every=int(_get(_get(cfg, "retrain"), "every", 1) or 1),
            featurize_workers=int(_get(_get(cfg.model, "options"), "featurize_workers", 1) or 1), **kwargs,
        )

    def __repr__(self) -> str:
        where = repr(self.pool) if self.pool is not None else repr(self.space)
        return (f"Engine(strategy={self.strategy!r}, acquisition={self.acquisition_name!r}, seed={self.seed}, "
                f"n_observed={self.n_observed}, {where})")

    # -- state -------------------------------------------------------------------------------
    @property
    def n_observed(self) -> int:
        """Number of observations learned from."""
        return len(self._obs)

    @property
    def model_version(self) -> str:
        """Version of the current model: ``<strategy>-<fit number>-<digest of the data>``; ``design-s<seed>`` before."""
        return self.surrogate.version or f"design-s{self.seed}"

    @property
    def observations(self) -> list[Observation]:
        """Copies of the observations, in order."""
        return list(self._obs)

    @property
    def measured_keys(self) -> set[str]:
        """Keys with at least one observation."""
        return set(self._measured)

    @property
    def excluded(self) -> Mapping[str, str]:
        """Candidate key -> why the model cannot use it (the backbone cannot featurise it); never proposed."""
        return self.surrogate.excluded

    @property
    def backbone(self) -> Backbone | None:
        """The loaded pretrained backbone (after :meth:`prepare`), if any."""
        return self.surrogate.backbone if isinstance(self.surrogate, PretrainedSurrogate) else None

    @property
    def heads(self) -> HeadEnsemble | None:
        """The fitted MLP head ensemble of a pretrained engine (None for a GP head or before a fit)."""
        return self.surrogate.heads if isinstance(self.surrogate, PretrainedSurrogate) else None

    @property
    def head_inputs(self) -> torch.Tensor | None:
        """``[N, D(+1)]`` standardised embedding (+ prior) per pool row, after :meth:`prepare`."""
        return self.surrogate.head_inputs if isinstance(self.surrogate, PretrainedSurrogate) else None

    @property
    def head_kind(self) -> str | None:
        """``gp`` or ``mlp``: the head of the last pretrained fit (None before it, or without a backbone)."""
        return self.surrogate.head_kind if isinstance(self.surrogate, PretrainedSurrogate) else None

    @property
    def _ensemble(self) -> PoolEnsemble | None:
        """The from-scratch ensemble (``backbone: scratch``), for benchmarks that time it."""
        return self.surrogate.ensemble if isinstance(self.surrogate, ScratchEnsembleSurrogate) else None

    def best_value(self) -> float | None:
        """Best measured raw value under the objective (None before any measurement)."""
        best: float | None = None
        for o in self._obs:
            if self.objective.is_better(o.value, best):
                best = o.value
        return best

    def observe(self, observations: Iterable[Observation]) -> None:
        """Learn from measurements (validated; the model refits lazily at the next ``propose``).

        Raises:
            EngineError: Unknown pool key, recipe outside the space, or a non-finite value.
        """
        new: list[tuple[Observation, int]] = []
        for ob in observations:
            value = float(ob.value)
            if not math.isfinite(value):
                raise EngineError(f"observation {ob.key!r}: value must be finite, got {ob.value!r}")
            if self.pool is not None:
                key = str(ob.key)
                if key not in self.pool:
                    key = self.pool.key_for_params(ob.params) or key
                if key not in self.pool:
                    raise EngineError(f"observation {ob.key!r}: unknown candidate key in {self.pool.source}")
                new.append((Observation(key, dict(ob.params) or self.pool.params(self.pool.index_of(key)), value),
                            self.pool.index_of(key)))
            else:
                space = self._space()
                params = dict(ob.params) if ob.params else self._params_from_key(str(ob.key))
                try:
                    key = space.key_of(params)
                    canon = space.canonical(params)
                except ValueError as exc:
                    raise EngineError(f"observation {ob.key!r}: {exc}") from exc
                new.append((Observation(key, canon, value), -1))
        for ob, idx in new:
            self._obs.append(ob)
            self._obs_index.append(idx)
            self._measured.add(ob.key)
        logger.debug("observed %d new, %d total", len(new), len(self._obs))

    def observe_failures(self, failed: Iterable[Any]) -> None:
        """Learn from failed experiments (keys, recipes or Proposals): they never give the objective
        model a value, they train the feasibility classifier (:mod:`sdl.engine.feasibility`) and are
        never proposed again.

        Raises:
            EngineError: Unknown pool key, or a failure in space mode (pools only, for now).
        """
        if self.pool is None:
            raise EngineError("observe_failures: the feasibility model works on candidate pools only")
        new: list[tuple[str, int]] = []
        for item in failed:
            keys = self._keys([item])
            for key in keys:
                if key not in self.pool:
                    raise EngineError(f"failed experiment {key!r}: unknown candidate key in {self.pool.source}")
                new.append((key, self.pool.index_of(key)))
        for key, row in new:
            self._failed.append(key)
            self._failed_index.append(row)
        logger.debug("observed %d new failures, %d total", len(new), len(self._failed))

    @property
    def failed_keys(self) -> list[str]:
        """Keys of the failed experiments, in order."""
        return list(self._failed)

    def _log_p_success(self) -> torch.Tensor | None:
        """``[N]`` log P(success) per pool row, or None (no failure yet, feasibility off, or -- with
        ``auto`` -- a classifier that cannot be fitted). Refitted when the experiments changed.

        Raises:
            EngineError: ``feasibility: on`` and the classifier cannot be fitted.
        """
        if self.feasibility == "off" or not self._failed or self.pool is None:
            return None
        state = (len(self._obs), len(self._failed))
        if state != self._feasibility_at:
            self._feasibility_at = state
            self.feasibility_model = None
            excluded = self.excluded
            rows = [i for i in self._obs_index if self.pool.keys[i] not in excluded]
            failed = [i for i in self._failed_index if self.pool.keys[i] not in excluded]
            try:
                X_all = self.surrogate.features()
                labels = torch.tensor([1.0] * len(rows) + [0.0] * len(failed), dtype=torch.float64)
                step("fitting the feasibility classifier on %d successes and %d failures", len(rows), len(failed))
                self.feasibility_model = GPClassifier(seed=self.seed).fit(X_all[torch.as_tensor(rows + failed)],
                                                                          labels)
                self._feasibility_p = self.feasibility_model.log_probability(X_all)
            except EngineError as exc:
                if self.feasibility == "on":
                    raise EngineError(f"acquisition.feasibility: on, but {exc}") from exc
                logger.info("no feasibility weighting this round: %s", exc)
        return self._feasibility_p if self.feasibility_model is not None else None

    def add_related(self, related: RelatedData, *, skip_measured: bool = False) -> None:
        """Seed the model with measurements of earlier campaigns (``transfer:``) as related tasks.

        They are never observations of this campaign: :attr:`n_observed`, :meth:`best_value`, the
        design quota and the pending/measured bookkeeping ignore them, so the budget and stopping
        rules count only this campaign's experiments; only the GP learns from them (a multi-task
        GP, :mod:`sdl.engine.models.multitask`). A candidate a source measured stays proposable
        unless ``skip_measured``.

        Raises:
            EngineError: The model cannot learn from related data (random, an MLP head, scratch).
        """
        head = str(_get(self.model_options, "head", "auto") or "auto")
        if not isinstance(self.surrogate, GPSurrogate | PretrainedSurrogate) or (
                isinstance(self.surrogate, PretrainedSurrogate) and head == "mlp"):
            raise EngineError(f"transfer: model {self.strategy!r} cannot learn from earlier campaigns; use model gp, "
                              "or gnn-ensemble with head gp or auto")
        self._related = related if len(related) else None
        self._related_taken = set()
        if skip_measured:
            from sdl.engine.models.multitask import related_row

            for key, params in zip(related.keys, related.params, strict=True):
                if self.pool is not None:
                    row = related_row(self.pool, key, params)
                    if row is not None:
                        self._related_taken.add(self.pool.keys[row])
                else:
                    with contextlib.suppress(ValueError):  # a recipe outside this space is never proposed anyway
                        self._related_taken.add(self._space().key_of(params))
        self._n_at_fit = -1
        logger.info("warm start: %d measurements of %d earlier campaign(s)%s", len(related), len(related.task_names),
                    f", {len(self._related_taken)} candidates they measured skipped" if skip_measured else "")

    @property
    def related(self) -> RelatedData | None:
        """The earlier campaigns' measurements the model learns from (``transfer:``), if any."""
        return self._related

    def _space(self) -> ParameterSpace:
        if self.space is None:
            raise EngineError("the engine has a candidate pool without a parameter space")
        return self.space

    def _params_from_key(self, key: str) -> dict[str, Any]:
        try:
            return dict(part.split("=", 1) for part in key.split(";"))
        except ValueError:
            raise EngineError(f"key {key!r} is not a recipe key of this space (expected name=value;...)") from None

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Do the surrogate's one-off work (featurise the pool with a pretrained backbone, cached).

        Called lazily by :meth:`propose`; call it first to show progress (``(done, total)``).
        Candidates the backbone cannot featurise end up in :attr:`excluded`.

        Raises:
            EngineError: The backbone cannot be loaded, or no candidate could be featurised.
        """
        self.surrogate.prepare(progress)

    def extend_pool(self, keys: Sequence[str], structure_texts: Sequence[str], formulas: Sequence[str],
                    extra: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Append new crystal candidates (generated ones) to the pool; the next proposal scores them too.

        Existing rows keep their index, so observations stay where they are; the surrogate is rebuilt
        over the larger pool (a pretrained backbone and its embedding cache are reused, so only the new
        crystals are featurised) and refitted at the next proposal. Keys already in the pool are skipped.

        Returns:
            How many candidates were added.

        Raises:
            EngineError: No crystal pool to grow.
        """
        if self.pool is None or self.pool.structure_column is None:
            raise EngineError("extend_pool: only an engine over a crystal pool with structures can grow it")
        fresh = [i for i, k in enumerate(keys) if k not in self.pool]
        if not fresh:
            return 0
        prepared = self.surrogate.head_inputs is not None if isinstance(self.surrogate, PretrainedSurrogate) else False
        try:
            self.pool = self.pool.extended([keys[i] for i in fresh], [structure_texts[i] for i in fresh],
                                           [formulas[i] for i in fresh],
                                           [extra[i] for i in fresh] if extra is not None else None)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        old = self.surrogate
        self.surrogate = build_surrogate(
            self._model_spec, seed=self.seed, pool=self.pool, space=None, extensive=self.extensive,
            ensemble_factory=self._ensemble_factory, backbone=getattr(old, "backbone", None),
            embedding_store=getattr(old, "store", None) or self._embedding_store,
            featurize_workers=self._featurize_workers, compute=self.compute,
        )
        self.selection = build_selection(self._acquisition_spec, self.surrogate, self.seed)
        self._n_at_fit = -1
        if prepared:
            self.prepare()
        logger.info("pool grown by %d candidates to %d", len(fresh), len(self.pool))
        return len(fresh)

    # -- propose -----------------------------------------------------------------------------
    def propose(self, q: int | None = None, pending: Sequence[Any] = (), exclude: Sequence[Any] = ()) -> list[Proposal]:
        """The next ``q`` experiments (distinct; never a measured, pending or excluded key).

        Design: an experiment is a design experiment iff fewer than ``initial_design.size``
        experiments are known so far, counting every observation plus the pending and excluded
        keys not already measured (a key both pending and excluded counts once). So a batch that
        straddles the end of the design returns only the design picks still owed (fewer than
        ``q``); the next call proposes model picks. While fewer observations than the surrogate
        needs (``min_observations``: 2, or 1 for random) are measured after the design, every
        call keeps proposing ``q`` design picks.

        Args:
            q: Batch size (default: ``acquisition.batch_size``).
            pending: Keys (or recipes / Proposals) of experiments proposed or running, not measured:
                never proposed, and joined to every q-batch as the acquisition's ``X_pending``.
            exclude: Keys (same forms) of candidates that must not be proposed (failed,
                abandoned): they leave the candidates and nothing else; they are not pending
                points and do not change the acquisition values of the others.

        Returns:
            Up to ``q`` proposals (fewer when fewer candidates remain or the design ends).

        Raises:
            EngineError: ``pool exhausted`` when no candidate is left.
        """
        q = int(q if q is not None else self.batch_size)
        if q < 1:
            raise EngineError(f"propose: q must be >= 1, got {q=}")
        pending_keys = self._keys(pending)
        exclude_keys = self._keys(exclude) - pending_keys
        # Excluded keys do not enter the seed: they must not change the acquisition of the others.
        state_seed = int(digest(self.seed, len(self._obs), sorted(pending_keys), n=8), 16)
        n_design = self._design_quota(q, pending_keys, exclude_keys)
        if self.pool is not None:
            return self._propose_pool(q, n_design, pending_keys, exclude_keys, state_seed)
        return self._propose_space(q, n_design, pending_keys, exclude_keys, state_seed)

    def _keys(self, items: Sequence[Any]) -> set[str]:
        keys: set[str] = set()
        for p in items:
            if isinstance(p, Proposal):
                keys.add(p.key)
            elif isinstance(p, Mapping):
                if self.pool is not None:
                    k = self.pool.key_for_params(p)
                    if k is not None:
                        keys.add(k)
                else:
                    keys.add(self._space().key_of(p))
            else:
                keys.add(str(p))
        return keys

    def _design_quota(self, q: int, pending: set[str], exclude: set[str]) -> int:
        """How many of ``q`` picks come from the design now (0: model picks); see :meth:`propose`."""
        failed = set(self._failed)
        so_far = len(self._obs) + len(pending - self._measured) + len((exclude | failed) - self._measured - pending)
        if so_far < self.design_size:
            return min(q, self.design_size - so_far)
        if len(self._obs) < self.surrogate.min_observations:
            return q
        return 0

    def _batch_id(self, keys: Sequence[str], pending: set[str]) -> str:
        return f"b-{digest(self.seed, self.model_version, len(self._obs), sorted(pending), list(keys))}"

    def _training_data(self) -> TrainingData:
        keys = tuple(o.key for o in self._obs)
        values = tuple(o.value for o in self._obs)
        if self.pool is not None:
            return TrainingData(keys, values, rows=np.asarray(self._obs_index, dtype=np.int64), related=self._related)
        return TrainingData(keys, values, X=self._space().encode([o.params for o in self._obs]), related=self._related)

    def _fit_if_needed(self) -> None:
        n = len(self._obs)
        if self.surrogate.fitted and n - self._n_at_fit < self.retrain_every:
            return
        step("fitting the %s model on %d measurements", self.surrogate.name, n)
        self.surrogate.fit(self._training_data())
        self._n_at_fit = n

    def fit(self) -> None:
        """Fit the model to the observations now (``propose`` does this lazily when it is stale).

        Raises:
            EngineError: ``random`` has no model, or fewer than 2 usable observations.
        """
        self._fit_if_needed()

    def predict_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted mean and std of the objective property for every pool row (``[N]`` each).

        In the property's own units (scaled back to the cell for extensive targets); rows the
        backbone could not featurise carry no information (see :attr:`excluded`).

        Raises:
            EngineError: No pool, or no model fitted yet (call :meth:`fit`).
        """
        if self.pool is None:
            raise EngineError("predict_pool: the engine has a parameter space, not a pool")
        if not self.surrogate.fitted:
            raise EngineError("predict_pool: no model fitted yet")
        return self.surrogate.predict_pool()

    # pool mode .................................................................................
    def _propose_pool(
        self, q: int, n_design: int, pending: set[str], exclude: set[str], state_seed: int
    ) -> list[Proposal]:
        pool = self.pool
        assert pool is not None
        self.prepare()
        taken = self._measured | pending | exclude | set(self.excluded) | set(self._failed) | self._related_taken
        avail = np.array([i for i, k in enumerate(pool.keys) if k not in taken], dtype=np.int64)
        if avail.size == 0:
            raise EngineError(f"pool exhausted: all {len(pool)} candidates of {pool.source} are measured, pending "
                              f"or excluded")
        if n_design:
            order = self._design_order_of(len(pool))
            design: list[int] = order[np.isin(order, avail)][:n_design].tolist()
            return self._make(design, None, None, None, DESIGN, pending, version=f"design-s{self.seed}")
        mean = std = log_p = None
        r = PoolRound(avail=avail, q=q, seed=state_seed, objective=self.objective, surrogate=self.surrogate,
                      prefilter_k=self.prefilter_k, chunk_size=self.chunk_size)
        if self.selection.needs_model:
            self._fit_if_needed()
            selection, objective = self.selection, self.objective
            scores = self.surrogate.score_pool(
                avail, lambda m, s: selection.shortlist_score(objective, m, s), self.prefilter_k)
            mean, std = scores.mean, scores.std
            log_p = self._log_p_success() if isinstance(self.selection, AcquisitionSelection) else None
            r = PoolRound(
                avail=avail, q=q, seed=state_seed, objective=self.objective, surrogate=self.surrogate, mean=mean,
                std=std, baseline_rows=sorted(set(self._obs_index)),
                y=torch.tensor([o.value for o in self._obs], dtype=torch.float64),
                pending_rows=sorted(pool.index_of(k) for k in pending if k in pool),
                prefilter_k=self.prefilter_k, chunk_size=self.chunk_size, shortlist_rows=scores.shortlist,
                log_p_success=log_p,
            )
        picks, values = self.selection.pick_rows(r)
        return self._make(picks, values, mean, std, self.strategy, pending, version=self._proposal_version(),
                          log_p=log_p)

    def _proposal_version(self) -> str:
        return self.surrogate.version or f"{self.strategy}-s{self.seed}"

    def _design_order_of(self, n: int) -> np.ndarray:
        """Pool rows in design order: a seeded permutation, or best prior first (``prior``)."""
        if self._design_order is None and self.design_method == "prior":
            prior = self.surrogate.prior()
            assert prior is not None
            utility = np.asarray(self.objective.utility(prior))
            self._design_order = np.argsort(-np.where(np.isnan(utility), -np.inf, utility), kind="stable")
        if self._design_order is None:
            self._design_order = np.random.default_rng([self.seed, 0xD5]).permutation(n)
        return self._design_order

    def _make(
        self,
        picks: Sequence[int],
        values: Sequence[float] | None,
        mean: torch.Tensor | None,
        std: torch.Tensor | None,
        strategy: str,
        pending: set[str],
        version: str,
        log_p: torch.Tensor | None = None,
    ) -> list[Proposal]:
        pool = self.pool
        assert pool is not None
        keys = [pool.keys[i] for i in picks]
        batch_id = self._batch_id(keys, pending)
        return [
            Proposal(
                key=keys[j], params=pool.params(i),
                acquisition_value=None if values is None else float(values[j]),
                predicted_mean=None if mean is None else float(mean[i]),
                predicted_std=None if std is None else float(std[i]),
                model_version=version, batch_id=batch_id, strategy=strategy,
                p_success=None if log_p is None else float(log_p[i].exp()),
            )
            for j, i in enumerate(picks)
        ]

    # space mode ................................................................................
    def _propose_space(
        self, q: int, n_design: int, pending: set[str], exclude: set[str], state_seed: int
    ) -> list[Proposal]:
        space = self._space()
        taken = self._measured | pending | exclude | self._related_taken
        card = space.cardinality()
        if card is not None and len(taken) >= card:
            raise EngineError(f"pool exhausted: all {card} recipes of {space!r} are measured, pending or excluded")
        if n_design:
            method: Literal["sobol", "random"] = "sobol" if self.design_method == "sobol" else "random"
            n_draw = self.design_size + len(taken) + q
            recipes = _fresh(space, space.sample(n_draw, self.seed, method), taken, n_design)
            return self._make_space(recipes, None, DESIGN, pending, f"design-s{self.seed}")
        r = SpaceRound(space=space, taken=taken, q=q, seed=state_seed, objective=self.objective,
                       surrogate=self.surrogate)
        if self.selection.needs_model:
            self._fit_if_needed()
            r = SpaceRound(
                space=space, taken=taken, q=q, seed=state_seed, objective=self.objective, surrogate=self.surrogate,
                X_baseline=space.encode([o.params for o in self._obs]),
                y=torch.tensor([o.value for o in self._obs], dtype=torch.float64),
                X_pending=space.encode([self._params_from_key(k) for k in sorted(pending)]) if pending else None,
            )
        recipes, values = self.selection.pick_recipes(r)
        return self._make_space(recipes, values, self.strategy, pending, self._proposal_version())

    def _make_space(
        self, recipes: list[dict[str, Any]], values: Sequence[float | None] | None, strategy: str,
        pending: set[str], version: str,
    ) -> list[Proposal]:
        space = self._space()
        keys = [space.key_of(r) for r in recipes]
        mean = std = None
        if self.surrogate.fitted and strategy != DESIGN and self.selection.needs_model and recipes:
            mean, std = self.surrogate.predict(space.encode(recipes))
        batch_id = self._batch_id(keys, pending)
        out = []
        for j, r in enumerate(recipes):
            value = None if values is None else values[j]
            out.append(Proposal(
                key=keys[j], params=space.canonical(r),
                acquisition_value=None if value is None else float(value),
                predicted_mean=None if mean is None else float(mean[j]),
                predicted_std=None if std is None else float(std[j]),
                model_version=version, batch_id=batch_id, strategy=strategy,
            ))
        return out

    # -- uncertainty quality -----------------------------------------------------------------
    def uncertainty_metrics(self) -> dict[str, Any]:
        """``sdl.engine.uq`` metrics of the fitted model on held-out predictions of its own labels.

        No model is refitted: a GP gives exact leave-one-out predictions, an ensemble the
        out-of-bag predictions of its bootstrap members (each label predicted by the members that
        never saw it, with the recalibrated spread). Returns ``{}`` for ``random``.

        Raises:
            EngineError: No model fitted yet, or fewer than 4 held-out labels.
        """
        return self.surrogate.uncertainty_metrics()


def top_k_indices(score: torch.Tensor, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores (stable order), as a numpy array."""
    from sdl.engine.optim import top_k

    rows: np.ndarray = top_k(score, k).numpy()
    return rows
