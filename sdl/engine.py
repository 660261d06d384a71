"""The active-learning engine: ``observe()`` measurements, ``propose()`` the next q experiments.

Plain Python (no Prefect, no instruments), so scripts, notebooks, the Prefect flow and the pool
replay benchmark all drive the same object. One round is::

    engine.observe([Observation(key, params, value), ...])
    batch = engine.propose(q=4, pending=[...keys of proposed/running experiments...])

Strategies (``model.name``):

* ``random`` -- uniform over what is neither measured nor pending (the benchmark baseline).
* ``gp`` -- :func:`sdl.models.gp.fit_gp` on unit-cube recipes (space or parameter pool) or on
  composition descriptors (crystal pool); continuous mode optimises the acquisition in the box
  and rounds integers / categoricals; pool mode scores only table rows.
* ``gnn-ensemble`` -- crystal pools. With ``options.backbone`` a pretrained model (``chgnet``,
  the default) embeds every candidate once (:mod:`sdl.models.embedding_store`); a head on the
  frozen embedding and the backbone's zero-shot prior learns the property: an ensemble of small
  networks with a recalibrated spread (``head: mlp``, an ``M x N`` member matrix wrapped by
  :class:`~sdl.models.pool_ensemble.PoolEnsembleModel`) or a GP (``head: gp``); ``head: auto``
  (default) takes the GP up to 1,000 labels, where it measured better, and the ensemble beyond.
  ``backbone: scratch`` trains ``sdl.models.ensemble.GNNEnsemble`` (CGCNN-style) from scratch.

Extensive targets (``objective.extensive``) are learned per atom and scaled back per candidate
(:mod:`sdl.models.extensive`); uncertainty metrics come from out-of-bag or leave-one-out
predictions of the fitted model, never from refits.

Rules every strategy obeys: the first ``initial_design.size`` measurements come from a design
that depends only on the seed (a seeded permutation of the pool, or scrambled Sobol / uniform
points of the space), so every strategy starts from the same points; a proposal never repeats a
measured or pending key; q-batches are distinct; the same state (seed, observations, pending)
gives the same proposals; ``EngineError("pool exhausted ...")`` only when nothing is left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdl.exceptions import EngineError
from sdl.objectives import Objective
from sdl.space import CandidatePool, ParameterSpace

if TYPE_CHECKING:
    from sdl.models.backbones import Backbone
    from sdl.models.embedding_store import EmbeddingStore
    from sdl.models.pretrained import HeadEnsemble

__all__ = ["STRATEGIES", "Engine", "Observation", "Proposal"]

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "gp", "gnn-ensemble")
DESIGN = "initial-design"
GP_HEAD_MAX_LABELS = 1000  # head "auto": exact GP up to here, the head ensemble beyond


@dataclass(frozen=True)
class Observation:
    """One measurement of the objective's property.

    Args:
        key: Candidate id (pool) or ``ParameterSpace.key_of`` string (space).
        params: The recipe (needed in space mode when the key is not canonical).
        value: Raw measured value of the property.
    """

    key: str
    params: Mapping[str, Any] = field(default_factory=dict)
    value: float = math.nan


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
    """

    key: str
    params: dict[str, Any]
    acquisition_value: float | None
    predicted_mean: float | None
    predicted_std: float | None
    model_version: str
    batch_id: str
    strategy: str


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _digest(*parts: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _default_ensemble_factory(options: Any, seed: int) -> Any:
    from sdl.models.ensemble import GNNEnsemble

    return GNNEnsemble(options, seed=seed)


class Engine:
    """Propose experiments and learn from measurements.

    Args:
        objective: ``sdl.config.Objective`` / :class:`sdl.objectives.Objective` (goal, target_range).
        model: Config with ``name`` (``random``, ``gp``, ``gnn-ensemble``) and ``options``.
        acquisition: Config with ``function`` (qlogei, qlognei, qucb, max-variance, thompson),
            ``batch_size`` and ``beta``.
        seed: Seed of the design, the samplers and the models.
        pool: Candidate pool (pool mode); takes precedence over ``space``.
        space: Parameter space (continuous mode).
        initial_design: Config with ``strategy`` (``random`` / ``sobol``) and ``size``.
        retrain_every: Refit the model after this many new measurements.
        ensemble_factory: ``(options, seed) -> ensemble`` with ``fit(structures, y, keys)`` and
            ``predict_members(structures, keys, batch_size) -> Tensor[M, N]``; defaults to
            ``sdl.models.ensemble.GNNEnsemble``.
        prefilter_k: Candidates kept by the cheap optimistic score before the acquisition.
        chunk_size: Rows per acquisition call (bounds memory).
        backbone: Pretrained backbone for ``gnn-ensemble`` (loaded from ``options.backbone`` when
            None and the option is not ``scratch``).
        embedding_store: Where embeddings are cached (``sdl.models.embedding_store.default_store_path``
            when None).
        featurize_workers: Processes for featurising candidates the store lacks.
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
        chunk_size: int = 4096,
        backbone: Backbone | None = None,
        embedding_store: EmbeddingStore | None = None,
        featurize_workers: int = 1,
    ) -> None:
        self.objective = Objective.from_any(objective)
        self.strategy = str(_get(model, "name", model if isinstance(model, str) else "random"))
        if self.strategy not in STRATEGIES:
            raise EngineError(f"model.name: unknown strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")
        self.model_options = _get(model, "options", None)
        self.acquisition_name = str(_get(acquisition, "function", "qlognei")).lower()
        self.batch_size = int(_get(acquisition, "batch_size", 1) or 1)
        self.beta = float(_get(acquisition, "beta", 2.0) or 2.0)
        self.seed = int(seed)
        if pool is None and space is None:
            raise EngineError("Engine needs a candidate pool or a parameter space")
        self.pool = pool
        self.space = space if pool is None else (pool.space or space)
        self.design_size = int(_get(initial_design, "size", 8) or 0)
        self.design_method = str(_get(initial_design, "strategy", "sobol") or "sobol")
        self.retrain_every = max(1, int(retrain_every))
        self.prefilter_k = int(prefilter_k)
        self.chunk_size = int(chunk_size)
        self._ensemble_factory = ensemble_factory or _default_ensemble_factory
        if self.strategy == "gnn-ensemble" and (pool is None or pool.structure_column is None):
            raise EngineError("model gnn-ensemble needs a candidate pool with a structure column")
        if self.acquisition_name not in ("qucb", "qlogei", "qlognei", "max-variance", "thompson"):
            raise EngineError(f"acquisition.function: unknown {self.acquisition_name!r}")
        self._obs: list[Observation] = []
        self._obs_index: list[int] = []  # pool row of each observation (pool mode)
        self._measured: set[str] = set()
        self._model: Any = None
        self._ensemble: Any = None
        self._n_at_fit = -1
        self._n_fits = 0
        self._version = f"design-s{self.seed}"
        self.gp_kernel = str(_get(self.model_options, "kernel", "matern52") or "matern52")
        self.gp_descriptors = str(_get(self.model_options, "descriptors", "auto") or "auto")
        if self.strategy == "gp" and pool is not None:
            if self.gp_descriptors == "parameters" and not pool.parameter_columns:
                raise EngineError(f"model.options.descriptors: 'parameters' but {pool.source} has no parameter_columns")
            if self.gp_descriptors == "composition" and pool.formula_column is None and pool.structure_column is None:
                raise EngineError(f"model.options.descriptors: 'composition' but {pool.source} has no formula "
                                  "or structure column")
            if self.gp_descriptors == "auto" and not pool.parameter_columns and not pool.is_crystal:
                raise EngineError(f"model gp: {pool.source} has neither parameter_columns nor formulas/structures")
        self._features: torch.Tensor | None = None
        self._design_order: np.ndarray | None = None
        self.extensive = bool(_get(objective, "extensive", False))
        if self.extensive and (pool is None or not pool.is_crystal):
            raise EngineError("objective.extensive: only crystal pools have cells to scale by")
        self._scale: torch.Tensor | None = None
        self.backbone_name = str(_get(self.model_options, "backbone", "chgnet") or "chgnet")
        self.pretrained = self.strategy == "gnn-ensemble" and self.backbone_name != "scratch"
        self.head = str(_get(self.model_options, "head", "auto") or "auto")
        self.use_prior = bool(_get(self.model_options, "use_prior", True))
        self._backbone = backbone
        self._store = embedding_store
        self.featurize_workers = max(1, int(featurize_workers))
        self.excluded: dict[str, str] = {}  # candidate key -> why the backbone cannot featurise it
        self._inputs: torch.Tensor | None = None  # pretrained head inputs, [N, D (+1 prior)]
        self._prior: np.ndarray | None = None
        self._heads: HeadEnsemble | None = None
        self._gp: Any = None
        self._fitted_n = 0
        self._fit_rows = np.zeros(0, dtype=np.int64)
        if self.design_method == "prior" and not (self.pretrained and self.use_prior):
            raise EngineError("initial_design.strategy: 'prior' needs model gnn-ensemble with a pretrained "
                              "backbone and use_prior")
        if self.design_method == "prior" and self.objective.goal == "target":
            raise EngineError("initial_design.strategy: 'prior' ranks by the backbone's prior; it needs goal "
                              "maximize or minimize, not target")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_campaign(cls, cfg: Any, **kwargs: Any) -> Engine:
        """Engine for a ``sdl.config.CampaignConfig`` (search space, objective, model, acquisition)."""
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
        """Version of the current model: ``<strategy>-<fit number>-<digest of the data>``."""
        return self._version

    @property
    def observations(self) -> list[Observation]:
        """Copies of the observations, in order."""
        return list(self._obs)

    @property
    def measured_keys(self) -> set[str]:
        """Keys with at least one observation."""
        return set(self._measured)

    def best_value(self) -> float | None:
        """Best measured raw value under the objective (None before any measurement)."""
        return self.objective.best_value([o.value for o in self._obs])

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
                params = dict(ob.params) if ob.params else self._params_from_key(str(ob.key))
                try:
                    key = self.space.key_of(params)  # type: ignore[union-attr]
                    canon = self.space.canonical(params)  # type: ignore[union-attr]
                except ValueError as exc:
                    raise EngineError(f"observation {ob.key!r}: {exc}") from exc
                new.append((Observation(key, canon, value), -1))
        for ob, idx in new:
            self._obs.append(ob)
            self._obs_index.append(idx)
            self._measured.add(ob.key)
        logger.debug("observed %d new, %d total", len(new), len(self._obs))

    def _params_from_key(self, key: str) -> dict[str, Any]:
        try:
            return dict(part.split("=", 1) for part in key.split(";"))
        except ValueError:
            raise EngineError(f"key {key!r} is not a recipe key of this space (expected name=value;...)") from None

    # -- pretrained features -----------------------------------------------------------------
    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Featurise the pool with the backbone (cached); report and exclude what cannot be.

        Called lazily by :meth:`propose`; call it first to show progress (``(done, total)``).

        Raises:
            EngineError: The backbone cannot be loaded, or no candidate could be featurised.
        """
        if not self.pretrained or self._inputs is not None:
            return
        from sdl.models.backbones import BackboneError, load_backbone
        from sdl.models.embedding_store import EmbeddingStore, default_store_path, featurize_texts
        from sdl.models.pretrained import standardized_inputs

        pool = self.pool
        assert pool is not None
        try:
            if self._backbone is None:
                self._backbone = load_backbone(self.backbone_name)
        except BackboneError as exc:
            raise EngineError(f"model.options.backbone: {exc}") from exc
        if self._store is None:
            self._store = EmbeddingStore(default_store_path())
        feats = featurize_texts(self._backbone, pool.structure_texts(), self._store, fmt=pool.structure_format,
                                workers=self.featurize_workers, progress=progress, spec=self.backbone_name)
        for i, why in sorted(feats.errors.items()):
            self.excluded[pool.keys[i]] = why
        for key, why in list(self.excluded.items())[:10]:
            logger.warning("%s: candidate %r excluded: %s", pool.source, key, why)
        if len(self.excluded) > 10:
            logger.warning("%s: %d candidates excluded in all (the backbone cannot featurise them)", pool.source,
                           len(self.excluded))
        if len(self.excluded) == len(pool):
            raise EngineError(f"{pool.source}: the {self._backbone.name} backbone could not featurise any candidate")
        self._prior = feats.prior
        if self.extensive:
            featurised = ~np.isin(np.arange(len(pool)), list(feats.errors))
            if np.isfinite(feats.n_atoms[featurised]).all():  # no need to parse the pool again
                self._scale = torch.as_tensor(np.where(featurised, feats.n_atoms, 1.0), dtype=torch.float64)
        self._inputs = standardized_inputs(feats.embeddings, feats.prior if self.use_prior else None)

    @property
    def backbone(self) -> Backbone | None:
        """The loaded backbone (after :meth:`prepare`), if any."""
        return self._backbone

    def _row_scale(self) -> torch.Tensor:
        """Per-candidate divisor of the labels: atoms per cell for extensive targets, else 1."""
        if self._scale is None:
            pool = self.pool
            assert pool is not None
            if self.extensive:
                self._scale = torch.as_tensor(pool.n_atoms(), dtype=torch.float64)
            else:
                self._scale = torch.ones(len(pool), dtype=torch.float64)
        return self._scale

    # -- propose -----------------------------------------------------------------------------
    def propose(self, q: int | None = None, pending: Sequence[Any] = ()) -> list[Proposal]:
        """The next ``q`` experiments (distinct; never a measured or pending key).

        Args:
            q: Batch size (default: ``acquisition.batch_size``).
            pending: Keys (or recipes / Proposals) of experiments proposed or running, not measured.

        Returns:
            Up to ``q`` proposals (fewer when fewer candidates remain).

        Raises:
            EngineError: ``pool exhausted`` when no candidate is left.
        """
        q = int(q if q is not None else self.batch_size)
        if q < 1:
            raise EngineError(f"propose: q must be >= 1, got {q=}")
        pending_keys = self._pending_keys(pending)
        state_seed = int(_digest(self.seed, len(self._obs), sorted(pending_keys), n=8), 16)
        if self.pool is not None:
            return self._propose_pool(q, pending_keys, state_seed)
        return self._propose_space(q, pending_keys, state_seed)

    def _pending_keys(self, pending: Sequence[Any]) -> set[str]:
        keys: set[str] = set()
        for p in pending:
            if isinstance(p, Proposal):
                keys.add(p.key)
            elif isinstance(p, Mapping):
                if self.pool is not None:
                    k = self.pool.key_for_params(p)
                    if k is not None:
                        keys.add(k)
                else:
                    keys.add(self.space.key_of(p))  # type: ignore[union-attr]
            else:
                keys.add(str(p))
        return keys

    def _batch_id(self, keys: Sequence[str], pending: set[str]) -> str:
        return f"b-{_digest(self.seed, self._version, len(self._obs), sorted(pending), list(keys))}"

    def _in_design(self) -> bool:
        need = 1 if self.strategy == "random" else 2
        return len(self._obs) < max(self.design_size, need)

    # pool mode .................................................................................
    def _propose_pool(self, q: int, pending: set[str], state_seed: int) -> list[Proposal]:
        pool = self.pool
        assert pool is not None
        self.prepare()
        taken = self._measured | pending | set(self.excluded)
        avail = np.array([i for i, k in enumerate(pool.keys) if k not in taken], dtype=np.int64)
        if avail.size == 0:
            raise EngineError(f"pool exhausted: all {len(pool)} candidates of {pool.source} are measured, pending "
                              f"or excluded")
        if self._in_design():
            if self._design_order is None and self.design_method == "prior":
                assert self._prior is not None
                utility = self.objective.utility(np.nan_to_num(self._prior, nan=np.inf if self.objective.goal ==
                                                               "minimize" else -np.inf))
                self._design_order = np.argsort(-utility, kind="stable")
            if self._design_order is None:
                self._design_order = np.random.default_rng([self.seed, 0xD5]).permutation(len(pool))
            free = np.isin(self._design_order, avail)
            picks = self._design_order[free][:q].tolist()
            return self._make(picks, None, None, None, DESIGN, pending, version=f"design-s{self.seed}")
        if self.strategy == "random":
            from sdl.models.random import random_choice

            picks = random_choice(avail, q, self.seed, state_seed)
            return self._make(picks, None, None, None, "random", pending, version=f"random-s{self.seed}")
        self._fit_pool_if_needed()
        mean, std = self._pool_mean_std()
        pend_idx = [pool.index_of(k) for k in pending if k in pool]
        if self.acquisition_name == "thompson":
            picks, values = self._thompson_pool(avail, mean, std, q, state_seed)
        else:
            picks, values = self._acquire_pool(avail, mean, std, pend_idx, q, state_seed)
        return self._make(picks, values, mean, std, self.strategy, pending)

    def fit(self) -> None:
        """Fit the model to the observations now (``propose`` does this lazily when it is stale).

        Raises:
            EngineError: ``random`` has no model, or fewer than 2 usable observations.
        """
        if self.strategy == "random":
            raise EngineError("model random has nothing to fit")
        if self.pool is not None:
            self._fit_pool_if_needed()
        else:
            self._fit_space_if_needed()

    def predict_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted mean and std of the objective property for every pool row (``[N]`` each).

        In the property's own units (scaled back to the cell for extensive targets); rows the
        backbone could not featurise carry no information (see :attr:`excluded`).

        Raises:
            EngineError: No pool, or no model fitted yet (call :meth:`fit`).
        """
        if self.pool is None:
            raise EngineError("predict_pool: the engine has a parameter space, not a pool")
        if self._model is None:
            raise EngineError("predict_pool: no model fitted yet")
        return self._pool_mean_std()

    def _shortlist(self, avail: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
        if avail.size <= self.prefilter_k:
            return avail
        a = torch.as_tensor(avail)
        if self.acquisition_name == "max-variance":
            score = std[a]
        else:
            score = self.objective.optimistic(mean[a], std[a], self.beta)
        return avail[top_k_indices(score, self.prefilter_k)]

    def _acquire_pool(
        self, avail: np.ndarray, mean: torch.Tensor, std: torch.Tensor, pend_idx: list[int], q: int, state_seed: int
    ) -> tuple[list[int], list[float]]:
        from sdl.acquisition import build_acquisition
        from sdl.optim import greedy_select

        short = self._shortlist(avail, mean, std)
        X_all = self._acq_inputs()
        obs_idx = torch.as_tensor(sorted(set(self._obs_index)))
        y = torch.tensor([o.value for o in self._obs], dtype=torch.float64)
        acqf = build_acquisition(
            self.acquisition_name, self._model, self.objective, X_baseline=X_all[obs_idx], y_baseline=y,
            X_pending=X_all[torch.as_tensor(pend_idx, dtype=torch.long)] if pend_idx else None,
            beta=self.beta, seed=state_seed,
        )
        rows, values = greedy_select(acqf, X_all[torch.as_tensor(short)], q, chunk=self.chunk_size)
        return short[rows].tolist(), values

    def _thompson_pool(
        self, avail: np.ndarray, mean: torch.Tensor, std: torch.Tensor, q: int, state_seed: int
    ) -> tuple[list[int], list[float]]:
        from sdl.models.pool_ensemble import PoolEnsembleModel
        from sdl.optim import thompson_select

        short = self._shortlist(avail, mean, std)
        if isinstance(self._model, PoolEnsembleModel):
            preds = self._model.predictions
            order = np.random.default_rng(state_seed).permutation(preds.shape[0])
            draw = preds[torch.as_tensor(order)][:, torch.as_tensor(short)]
        else:
            X = self._acq_inputs()[torch.as_tensor(short)]
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(state_seed)
                draw = self._model.posterior(X).rsample(torch.Size([q])).reshape(q, -1)
        rows, values = thompson_select(draw, self.objective, q)
        return short[rows].tolist(), values

    def _acq_inputs(self) -> torch.Tensor:
        """What the BoTorch model takes per pool row: an index (ensembles) or features (+ scale column)."""
        from sdl.models.pool_ensemble import PoolEnsembleModel

        if isinstance(self._model, PoolEnsembleModel):
            return torch.arange(len(self.pool), dtype=torch.float64).unsqueeze(-1)  # type: ignore[arg-type]
        X = self._inputs if self.pretrained else self._pool_features()
        assert X is not None
        return torch.cat([X, self._row_scale().unsqueeze(-1)], dim=1) if self.extensive else X

    def _pool_features(self) -> torch.Tensor:
        if self._features is None:
            pool = self.pool
            assert pool is not None
            if pool.parameter_columns and self.gp_descriptors != "composition":
                self._features = pool.parameter_matrix()
            else:
                from sdl.models.composition import composition_features

                self._features = torch.as_tensor(composition_features(pool.formulas()))
        return self._features

    def _fit_pool_if_needed(self) -> None:
        n = len(self._obs)
        if self._model is not None and n - self._n_at_fit < self.retrain_every:
            return
        pool = self.pool
        assert pool is not None
        from sdl.models.pool_ensemble import PoolEnsembleModel

        self.prepare()
        pairs = [(i, o.value) for i, o in zip(self._obs_index, self._obs) if pool.keys[i] not in self.excluded]
        if len(pairs) < 2:
            raise EngineError(f"{pool.source}: need 2 measurements of featurisable candidates to fit, have {len(pairs)}")
        idx = torch.as_tensor([i for i, _ in pairs])
        scale = self._row_scale()
        y = torch.tensor([v for _, v in pairs], dtype=torch.float64) / scale[idx]
        self._heads = None
        if self.strategy == "gp" or (self.pretrained and self._head_kind(len(pairs)) == "gp"):
            from sdl.models.gp import fit_gp

            X_all = self._inputs if self.pretrained else self._pool_features()
            assert X_all is not None
            bounds = torch.stack([X_all.min(dim=0).values, X_all.max(dim=0).values])
            gp = fit_gp(X_all[idx], y, bounds=bounds, kernel=self.gp_kernel)
            if self.extensive:
                from sdl.models.extensive import RowScaledModel

                self._model = RowScaledModel(gp)
            else:
                self._model = gp
            self._gp = gp
        elif self.pretrained:
            from sdl.models.pretrained import HeadEnsemble, HeadOptions

            X_all = self._inputs
            assert X_all is not None
            opts = HeadOptions.sized_for(len(pairs), members=max(2, int(_get(self.model_options, "members", 5) or 5)))
            self._heads = HeadEnsemble(opts, seed=self.seed,
                                       prior_column=X_all.shape[1] - 1 if self.use_prior else None).fit(X_all[idx], y)
            self._model = PoolEnsembleModel(self._heads.predict_members(X_all) * scale)
        else:
            if self._ensemble is None:
                self._ensemble = self._ensemble_factory(self.model_options, self.seed)
            rows = idx.tolist()
            self._ensemble.fit(pool.structures(rows), y.numpy(), [pool.keys[i] for i in rows])
            preds = self._ensemble.predict_members(pool.structures(), pool.keys, batch_size=1024)
            self._model = PoolEnsembleModel(torch.as_tensor(preds, dtype=torch.float64) * scale)
        self._fitted_n = len(pairs)
        self._fit_rows = idx.numpy()
        self._after_fit(n)

    @property
    def heads(self) -> HeadEnsemble | None:
        """The fitted MLP head ensemble of a pretrained engine (None for a GP head or before a fit)."""
        return self._heads

    @property
    def head_inputs(self) -> torch.Tensor | None:
        """``[N, D(+1)]`` standardised embedding (+ prior) per pool row, after :meth:`prepare`."""
        return self._inputs

    @property
    def head_kind(self) -> str | None:
        """``gp`` or ``mlp``: the head of the last pretrained fit (None before it, or without a backbone)."""
        if not self.pretrained or self._model is None:
            return None
        return "mlp" if self._heads is not None else "gp"

    def _head_kind(self, n_labels: int) -> str:
        if self.head == "auto":
            return "gp" if n_labels <= GP_HEAD_MAX_LABELS else "mlp"
        return self.head

    def _after_fit(self, n: int) -> None:
        self._n_at_fit = n
        self._n_fits += 1
        data = [(o.key, round(o.value, 12)) for o in self._obs]
        self._version = f"{self.strategy}-{self._n_fits}-{_digest(self.strategy, self.seed, data, n=10)}"
        logger.info("fitted %s on %d observations -> %s", self.strategy, n, self._version)

    def _pool_mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sdl.models.pool_ensemble import PoolEnsembleModel

        if isinstance(self._model, PoolEnsembleModel):
            return self._model.mean_std()
        from sdl.models.gp import predict_gp

        return predict_gp(self._model, self._acq_inputs())

    def _make(
        self,
        picks: Sequence[int],
        values: Sequence[float] | None,
        mean: torch.Tensor | None,
        std: torch.Tensor | None,
        strategy: str,
        pending: set[str],
        version: str | None = None,
    ) -> list[Proposal]:
        pool = self.pool
        assert pool is not None
        keys = [pool.keys[i] for i in picks]
        version = version or self._version
        batch_id = self._batch_id(keys, pending)
        out = []
        for j, i in enumerate(picks):
            out.append(Proposal(
                key=keys[j], params=pool.params(i),
                acquisition_value=None if values is None else float(values[j]),
                predicted_mean=None if mean is None else float(mean[i]),
                predicted_std=None if std is None else float(std[i]),
                model_version=version, batch_id=batch_id, strategy=strategy,
            ))
        return out

    # space mode ................................................................................
    def _propose_space(self, q: int, pending: set[str], state_seed: int) -> list[Proposal]:
        space = self.space
        assert space is not None
        taken = self._measured | pending
        card = space.cardinality()
        if card is not None and len(taken) >= card:
            raise EngineError(f"pool exhausted: all {card} recipes of {space!r} are measured or pending")
        if self._in_design():
            method = "sobol" if self.design_method == "sobol" else "random"
            n_draw = self.design_size + len(taken) + q
            recipes = self._fresh(space.sample(n_draw, self.seed, method), taken, q)
            return self._make_space(recipes, None, DESIGN, pending, f"design-s{self.seed}")
        if self.strategy == "random":
            recipes = self._fresh(space.sample(4 * q + len(taken), state_seed, "random"), taken, q)
            return self._make_space(recipes, None, "random", pending, f"random-s{self.seed}")
        self._fit_space_if_needed()
        from sdl.acquisition import build_acquisition
        from sdl.optim import optimize_box, thompson_select

        X_obs = space.encode([o.params for o in self._obs])
        y = torch.tensor([o.value for o in self._obs], dtype=torch.float64)
        values: list[float]
        if self.acquisition_name == "thompson":
            cand = space.sample(1024, state_seed, "sobol")
            Xc = space.encode(cand)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(state_seed)
                draw = self._model.posterior(Xc).rsample(torch.Size([q])).reshape(q, -1)
            free = [i for i, c in enumerate(cand) if space.key_of(c) not in taken]
            rows, values = thompson_select(draw[:, free], self.objective, q)
            recipes = [cand[free[r]] for r in rows]
        else:
            X_pend = space.encode([self._params_from_key(k) for k in sorted(pending)]) if pending else None
            acqf = build_acquisition(self.acquisition_name, self._model, self.objective, X_baseline=X_obs,
                                     y_baseline=y, X_pending=X_pend, beta=self.beta, seed=state_seed)
            X, vals = optimize_box(acqf, space.bounds, q, seed=state_seed)
            recipes = space.decode(X)
            values = vals.tolist() if vals.numel() == len(recipes) else [float(vals.max())] * len(recipes)
        kept: list[dict[str, Any]] = []
        kept_vals: list[float | None] = []
        seen = set(taken)
        for r, v in zip(recipes, values):
            k = space.key_of(r)
            if k not in seen:
                seen.add(k)
                kept.append(r)
                kept_vals.append(v)
        if len(kept) < q:  # rounding collided with taken recipes: fill with seeded random recipes
            fill = self._fresh(space.sample(8 * q + len(seen), state_seed + 1, "random"), seen, q - len(kept))
            kept += fill
            kept_vals += [None] * len(fill)
        return self._make_space(kept, kept_vals, self.strategy, pending, None)

    def _fresh(self, recipes: list[dict[str, Any]], taken: set[str], q: int) -> list[dict[str, Any]]:
        out, seen = [], set(taken)
        for r in recipes:
            k = self.space.key_of(r)  # type: ignore[union-attr]
            if k not in seen:
                seen.add(k)
                out.append(r)
                if len(out) == q:
                    break
        return out

    def _fit_space_if_needed(self) -> None:
        n = len(self._obs)
        if self._model is not None and n - self._n_at_fit < self.retrain_every:
            return
        if self.strategy != "gp":
            raise EngineError(f"model {self.strategy!r} needs a candidate pool; use gp or random for a parameter space")
        from sdl.models.gp import fit_gp

        X = self.space.encode([o.params for o in self._obs])  # type: ignore[union-attr]
        y = torch.tensor([o.value for o in self._obs], dtype=torch.float64)
        self._model = self._gp = fit_gp(X, y, bounds=self.space.bounds, kernel=self.gp_kernel)  # type: ignore[union-attr]
        self._fitted_n = n
        self._after_fit(n)

    def _make_space(
        self, recipes: list[dict[str, Any]], values: Sequence[float | None] | None, strategy: str,
        pending: set[str], version: str | None,
    ) -> list[Proposal]:
        space = self.space
        assert space is not None
        keys = [space.key_of(r) for r in recipes]
        version = version or self._version
        mean = std = None
        if self._model is not None and strategy not in (DESIGN, "random") and recipes:
            from sdl.models.gp import predict_gp

            mean, std = predict_gp(self._model, space.encode(recipes))
        batch_id = self._batch_id(keys, pending)
        return [
            Proposal(
                key=keys[j], params=space.canonical(r),
                acquisition_value=None if values is None or values[j] is None else float(values[j]),  # type: ignore[arg-type]
                predicted_mean=None if mean is None else float(mean[j]),
                predicted_std=None if std is None else float(std[j]),
                model_version=version, batch_id=batch_id, strategy=strategy,
            )
            for j, r in enumerate(recipes)
        ]

    # -- uncertainty quality -----------------------------------------------------------------
    def uncertainty_metrics(self) -> dict[str, Any]:
        """``sdl.uq`` metrics of the fitted model on held-out predictions of its own labels.

        No model is refitted: a GP gives exact leave-one-out predictions, an ensemble the
        out-of-bag predictions of its bootstrap members (each label predicted by the members that
        never saw it, with the recalibrated spread). Returns ``{}`` for ``random``.

        Raises:
            EngineError: No model fitted yet, or fewer than 4 held-out labels.
        """
        from sdl.models.pretrained import gp_leave_one_out
        from sdl.uq import uncertainty_metrics

        if self.strategy == "random":
            return {}
        if self._model is None:
            raise EngineError("uncertainty_metrics: no model fitted yet")
        if self._heads is not None:
            held, source = self._heads.held_out, "out-of-bag"
        elif self.strategy == "gnn-ensemble" and not self.pretrained:
            held, source = getattr(self._ensemble, "held_out", None), "out-of-bag"
        else:
            held, source = gp_leave_one_out(self._gp), "leave-one-out"
        if held is None or len(held.y) < 4:
            raise EngineError(f"uncertainty_metrics: need at least 4 held-out labels, have "
                              f"{0 if held is None else len(held.y)}")
        y, mean, std = held.y, held.mean, held.std
        if self.extensive and held.rows is not None:
            s = self._row_scale().numpy()[self._fit_rows[held.rows]]
            y, mean, std = y * s, mean * s, std * s
        out: dict[str, Any] = dict(uncertainty_metrics(y, mean, std))
        out.update(model_version=self._version, strategy=self.strategy, held_out=source, n_train=self._fitted_n)
        if self._heads is not None:
            out["spread_scale"] = self._heads.spread_scale
        return out


def top_k_indices(score: torch.Tensor, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores (stable order), as a numpy array."""
    from sdl.optim import top_k

    return top_k(score, k).numpy()
