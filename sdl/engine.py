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
* ``gnn-ensemble`` -- ``sdl.models.ensemble.GNNEnsemble`` predicts every pool candidate once per
  fit into an ``M x N`` matrix, wrapped by :class:`~sdl.models.pool_ensemble.PoolEnsembleModel`.

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
from typing import Any

import numpy as np
import torch

from sdl.exceptions import EngineError
from sdl.objectives import Objective
from sdl.space import CandidatePool, ParameterSpace

__all__ = ["Engine", "Observation", "Proposal", "STRATEGIES"]

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "gp", "gnn-ensemble")
DESIGN = "initial-design"


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
            retrain_every=int(_get(_get(cfg, "retrain"), "every", 1) or 1), **kwargs,
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
        taken = self._measured | pending
        avail = np.array([i for i, k in enumerate(pool.keys) if k not in taken], dtype=np.int64)
        if avail.size == 0:
            raise EngineError(f"pool exhausted: all {len(pool)} candidates of {pool.source} are measured or pending")
        if self._in_design():
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
        from sdl.optim import thompson_select

        short = self._shortlist(avail, mean, std)
        if self.strategy == "gnn-ensemble":
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
        if self.strategy == "gnn-ensemble":
            return torch.arange(len(self.pool), dtype=torch.float64).unsqueeze(-1)  # type: ignore[arg-type]
        return self._pool_features()

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
        y = torch.tensor([o.value for o in self._obs], dtype=torch.float64)
        idx = list(self._obs_index)
        if self.strategy == "gp":
            from sdl.models.gp import fit_gp

            X_all = self._pool_features()
            bounds = torch.stack([X_all.min(dim=0).values, X_all.max(dim=0).values])
            self._model = fit_gp(X_all[torch.as_tensor(idx)], y, bounds=bounds, kernel=self.gp_kernel)
        else:
            from sdl.models.pool_ensemble import PoolEnsembleModel

            if self._ensemble is None:
                self._ensemble = self._ensemble_factory(self.model_options, self.seed)
            structures = pool.structures(idx)
            self._ensemble.fit(structures, y.numpy(), [pool.keys[i] for i in idx])
            preds = self._ensemble.predict_members(pool.structures(), pool.keys, batch_size=1024)
            self._model = PoolEnsembleModel(torch.as_tensor(preds, dtype=torch.float64))
        self._after_fit(n)

    def _after_fit(self, n: int) -> None:
        self._n_at_fit = n
        self._n_fits += 1
        data = [(o.key, round(o.value, 12)) for o in self._obs]
        self._version = f"{self.strategy}-{self._n_fits}-{_digest(self.strategy, self.seed, data, n=10)}"
        logger.info("fitted %s on %d observations -> %s", self.strategy, n, self._version)

    def _pool_mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.strategy == "gnn-ensemble":
            return self._model.mean_std()
        from sdl.models.gp import predict_gp

        return predict_gp(self._model, self._pool_features())

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
        self._model = fit_gp(X, y, bounds=self.space.bounds, kernel=self.gp_kernel)  # type: ignore[union-attr]
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
    def uncertainty_metrics(self, k: int = 5) -> dict[str, Any]:
        """``sdl.uq.kfold_uncertainty`` of this strategy's model on the observed data.

        Each fold fits a fresh model (same strategy, options and seed) on the other folds and
        predicts the held-out measurements. Returns ``{}`` for ``random`` (no model).

        Raises:
            EngineError: Fewer than 4 observations.
        """
        from sdl.uq import kfold_uncertainty

        if self.strategy == "random":
            return {}
        n = len(self._obs)
        if n < 4:
            raise EngineError(f"uncertainty_metrics: need at least 4 observations, have {n}")
        y = np.array([o.value for o in self._obs], dtype=np.float64)
        rows = np.arange(n)
        if self.strategy == "gp":
            if self.pool is not None:
                X = self._pool_features()[torch.as_tensor(self._obs_index)]
                bounds = torch.stack([self._pool_features().min(0).values, self._pool_features().max(0).values])
            else:
                X = self.space.encode([o.params for o in self._obs])  # type: ignore[union-attr]
                bounds = self.space.bounds  # type: ignore[union-attr]

            def fit_predict(tr: np.ndarray, y_tr: np.ndarray, te: np.ndarray) -> tuple[Any, Any]:
                from sdl.models.gp import fit_gp, predict_gp

                m = fit_gp(X[torch.as_tensor(tr)], torch.as_tensor(y_tr), bounds=bounds, kernel=self.gp_kernel)
                return predict_gp(m, X[torch.as_tensor(te)])
        else:
            pool = self.pool
            assert pool is not None

            def fit_predict(tr: np.ndarray, y_tr: np.ndarray, te: np.ndarray) -> tuple[Any, Any]:
                ens = self._ensemble_factory(self.model_options, self.seed)
                idx_tr = [self._obs_index[i] for i in tr]
                idx_te = [self._obs_index[i] for i in te]
                ens.fit(pool.structures(idx_tr), y_tr, [pool.keys[i] for i in idx_tr])
                preds = torch.as_tensor(ens.predict_members(pool.structures(idx_te), [pool.keys[i] for i in idx_te]))
                std = preds.std(dim=0) if preds.shape[0] > 1 else torch.zeros(preds.shape[1])
                return preds.mean(dim=0), std

        out = kfold_uncertainty(fit_predict, rows, y, k=k, seed=self.seed)
        out["model_version"] = self._version
        out["strategy"] = self.strategy
        return out


def top_k_indices(score: torch.Tensor, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores (stable order), as a numpy array."""
    from sdl.optim import top_k

    return top_k(score, k).numpy()
