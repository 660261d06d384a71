"""Several objectives: the engine that learns every property and proposes by qLogNEHVI.

Why a subclass of :class:`sdl.engine.engine.Engine`: the design, the keys, pending and excluded
experiments, the pool and space modes and every rule the single-objective engine obeys stay as they
are; only three things change, each in one place here:

* every observation carries the other properties it measured (``Observation.values``);
* the surrogate is a :class:`~sdl.engine.models.multi_output.MultiOutputSurrogate` (one surrogate of
  the campaign's ``model:`` per property, a BoTorch ``ModelList``);
* the selection is :class:`ParetoSelection`: BoTorch's ``qLogNoisyExpectedHypervolumeImprovement``
  over the utilities (:class:`sdl.engine.pareto.MultiObjective`), outcome constraints as BoTorch
  constraints, the reference point from the YAML or inferred from the measured front each round.
  With one objective and constraints it is ``qLogNoisyExpectedImprovement`` with the constraints.

The random baseline stays random (no model), so ``sdl benchmark`` puts it beside.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sdl.engine.engine import Engine, Observation, PoolRound, Proposal, Selection, SpaceRound, _get, build_surrogate
from sdl.engine.models.multi_output import MultiOutputSurrogate, MultiTrainingData
from sdl.engine.models.surrogate import TrainingData
from sdl.engine.pareto import MultiObjective
from sdl.exceptions import EngineError

__all__ = ["MultiObjectiveEngine", "ParetoSelection"]

logger = logging.getLogger(__name__)


class ParetoSelection(Selection):
    """qLogNEHVI (several objectives) or constrained qLogNEI (one), maximised greedily / in the box.

    Args:
        objectives: The campaign's objectives and constraints.
        beta: Width of the optimistic pool pre-filter.
    """

    def __init__(self, objectives: MultiObjective, beta: float = 2.0) -> None:
        super().__init__(beta)
        self.objectives = objectives
        self.Y = np.zeros((0, len(objectives.properties)))  # raw measured values, set by the engine per round

    @property
    def name(self) -> str:  # type: ignore[override]
        """``qlognehvi``, or ``qlognei`` (constrained) for one objective."""
        return "qlognehvi" if self.objectives.n_objectives > 1 else "qlognei"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.objectives!r})"

    def reference(self) -> torch.Tensor:
        """The reference point in utilities (from the YAML, else inferred from the measurements)."""
        return torch.as_tensor(self.objectives.reference_utility(self.Y), dtype=torch.float64)

    def acquisition(self, model: Any, sampler: Any, X_baseline: torch.Tensor,
                    X_pending: torch.Tensor | None) -> Any:
        """The BoTorch acquisition over the ``ModelList``."""
        pending = X_pending if X_pending is not None and X_pending.numel() else None
        constraints = self.objectives.mc_constraints() or None
        if self.objectives.n_objectives == 1:
            from botorch.acquisition import qLogNoisyExpectedImprovement
            from botorch.acquisition.objective import GenericMCObjective

            first = self.objectives.objectives[0]

            def utility(samples: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
                u: torch.Tensor = first.utility(samples[..., 0])
                return u

            return qLogNoisyExpectedImprovement(
                model, X_baseline=X_baseline, sampler=sampler, X_pending=pending, prune_baseline=True,
                cache_root=False, constraints=constraints, objective=GenericMCObjective(utility),
            )
        from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement

        return qLogNoisyExpectedHypervolumeImprovement(
            model, ref_point=self.reference(), X_baseline=X_baseline, sampler=sampler,
            objective=self.objectives.mc_objective(), constraints=constraints, X_pending=pending,
            prune_baseline=True, cache_root=False,
        )

    def shortlist(self, r: PoolRound) -> np.ndarray:
        """Union of the best ``prefilter_k / m`` rows of each objective by optimistic utility."""
        if r.avail.size <= r.prefilter_k:
            return r.avail
        surrogate = r.surrogate
        assert isinstance(surrogate, MultiOutputSurrogate)
        preds = surrogate.predict_pool_all()
        a = torch.as_tensor(r.avail)
        per = max(1, r.prefilter_k // self.objectives.n_objectives)
        keep: set[int] = set()
        for o in self.objectives.objectives:
            mean, std = preds[o.property]
            from sdl.engine.optim import top_k

            keep.update(r.avail[top_k(o.optimistic(mean[a], std[a], self.beta), per).numpy()].tolist())
        return np.asarray(sorted(keep), dtype=np.int64)

    def pick_rows(self, r: PoolRound) -> tuple[list[int], list[float] | None]:
        """Greedy q-batch over the shortlist, pending rows joined as ``X_pending``."""
        from sdl.engine.optim import greedy_select

        surrogate = r.surrogate
        assert isinstance(surrogate, MultiOutputSurrogate)
        short = self.shortlist(r)
        X_all = surrogate.inputs()
        acqf = self.acquisition(
            surrogate.model, surrogate.sampler(r.seed), X_all[torch.as_tensor(r.baseline_rows)],
            X_all[torch.as_tensor(r.pending_rows, dtype=torch.long)] if r.pending_rows else None,
        )
        rows, values = greedy_select(acqf, X_all[torch.as_tensor(short)], r.q, chunk=r.chunk_size)
        return short[rows].tolist(), values

    def pick_recipes(self, r: SpaceRound) -> tuple[list[dict[str, Any]], list[float | None] | None]:
        """``optimize_acqf`` in the box, rounded; collisions replaced by seeded random recipes."""
        from sdl.engine.engine import box_recipes

        surrogate = r.surrogate
        assert isinstance(surrogate, MultiOutputSurrogate) and r.X_baseline is not None
        acqf = self.acquisition(surrogate.model, surrogate.sampler(r.seed), r.X_baseline, r.X_pending)
        return box_recipes(r, acqf)


class MultiObjectiveEngine(Engine):
    """:class:`Engine` over several properties (objectives and constrained ones).

    Args:
        objectives: The objectives, constraints and reference point (:class:`MultiObjective`).
        model: As for :class:`Engine`; one surrogate of it is built per property.
        acquisition: As for :class:`Engine` (``batch_size``, ``beta``); the rule is :class:`ParetoSelection`.
        extensive: Property -> whether it scales with the cell (default: not).
        **kwargs: The other arguments of :class:`Engine`.
    """

    def __init__(self, objectives: MultiObjective, model: Any, acquisition: Any, *,
                 extensive: Mapping[str, bool] | None = None, **kwargs: Any) -> None:
        self.objectives = objectives
        self.properties = list(objectives.properties)
        extensive = dict(extensive or {})
        first = objectives.objectives[0]
        primary = {"property": first.property, "goal": first.goal, "target_range": first.target_range,
                   "unit": first.unit, "extensive": bool(extensive.get(first.property, first.extensive))}
        super().__init__(primary, model, acquisition, **kwargs)
        self._values: list[dict[str, float]] = []  # the other properties of each observation, in order
        if not self.surrogate.has_model:
            return  # random: nothing to learn, the same picks as a single-objective random campaign
        if self.design_method == "prior" and first.goal == "target":
            raise EngineError("initial_design.strategy: 'prior' ranks by the first objective; it needs goal "
                              "maximize or minimize")
        parts = {first.property: self.surrogate}
        for prop in self.properties[1:]:
            flag = bool(extensive.get(prop, False))
            if flag and (self.pool is None or not self.pool.is_crystal):
                raise EngineError(f"objective {prop!r}: extensive needs a crystal pool")
            parts[prop] = build_surrogate(
                model, seed=self.seed, pool=self.pool, space=self.space if self.pool is None else None,
                extensive=flag, ensemble_factory=self._ensemble_factory, embedding_store=self._embedding_store,
                featurize_workers=self._featurize_workers,
            )
        self.surrogate = MultiOutputSurrogate(parts)
        self.selection = ParetoSelection(objectives, self.beta)
        self.acquisition_name = self.selection.name
        logger.info("several objectives: %r, %s over %d properties", objectives, self.selection.name,
                    len(self.properties))

    @classmethod
    def from_campaign(cls, cfg: Any, **kwargs: Any) -> MultiObjectiveEngine:
        """Engine for a campaign with ``objectives:`` (and ``constraints:``, ``reference_point:``)."""
        from sdl.engine.space import CandidatePool, ParameterSpace

        ss = cfg.search_space
        space = ParameterSpace.from_config(ss.parameters) if _get(ss, "parameters") else None
        pool = CandidatePool.from_config(ss.candidates, space=space) if _get(ss, "candidates") else None
        return cls(
            MultiObjective.from_campaign(cfg), cfg.model, cfg.acquisition,
            extensive={o.property: bool(o.extensive) for o in cfg.all_objectives},
            seed=cfg.seed, pool=pool, space=space, initial_design=cfg.initial_design,
            retrain_every=int(_get(_get(cfg, "retrain"), "every", 1) or 1),
            featurize_workers=int(_get(_get(cfg.model, "options"), "featurize_workers", 1) or 1), **kwargs,
        )

    # -- state -------------------------------------------------------------------------------
    def observe(self, observations: Iterable[Observation]) -> None:
        """Learn from measurements: ``value`` is the first objective's, ``values`` the others' (missing: unknown).

        Raises:
            EngineError: As :meth:`Engine.observe`, or a non-finite value of another property.
        """
        batch = list(observations)
        extra: list[dict[str, float]] = []
        for ob in batch:
            values = {}
            for prop in self.properties[1:]:
                if prop in ob.values:
                    v = float(ob.values[prop])
                    if not math.isfinite(v):
                        raise EngineError(f"observation {ob.key!r}: {prop} must be finite, got {v!r}")
                    values[prop] = v
            extra.append(values)
        super().observe(batch)
        self._values.extend(extra)

    def measured(self) -> np.ndarray:
        """``n x p`` raw values of every observation over :attr:`properties` (NaN: not measured)."""
        rows = [[o.value] + [v.get(p, math.nan) for p in self.properties[1:]]
                for o, v in zip(self._obs, self._values, strict=True)]
        return np.asarray(rows, dtype=np.float64).reshape(-1, len(self.properties))

    def pareto_front(self) -> list[Observation]:
        """The feasible observations on the measured Pareto front, in observation order."""
        Y = self.measured()
        mask = self.objectives.front(Y)
        return [o for o, keep in zip(self._obs, mask, strict=True) if keep]

    def hypervolume(self) -> float:
        """Hypervolume of the measured front (above the YAML's reference point, else the inferred one)."""
        Y = self.measured()
        try:
            ref = self.objectives.reference_utility(Y)
        except ValueError:
            return 0.0
        return self.objectives.hypervolume(Y, ref)

    def _training_data(self) -> TrainingData:
        base = super()._training_data()
        by: dict[str, TrainingData] = {self.properties[0]: base}
        for prop in self.properties[1:]:
            keep = [i for i, v in enumerate(self._values) if prop in v]
            by[prop] = TrainingData(
                tuple(base.keys[i] for i in keep), tuple(self._values[i][prop] for i in keep),
                rows=None if base.rows is None else base.rows[keep],
                X=None if base.X is None else base.X[torch.as_tensor(keep, dtype=torch.long)],
            )
        return MultiTrainingData(base.keys, base.values, rows=base.rows, X=base.X, by_property=by)

    def propose(self, q: int | None = None, pending: Sequence[Any] = (), exclude: Sequence[Any] = ()) -> list[Proposal]:
        """As :meth:`Engine.propose`; the selection sees every property measured so far."""
        if isinstance(self.selection, ParetoSelection):
            self.selection.Y = self.measured()
        return self._with_predictions(super().propose(q, pending, exclude))

    def _with_predictions(self, proposals: list[Proposal]) -> list[Proposal]:
        """Each model-based proposal with every property's predicted mean and std (``sdl ask --json``)."""
        surrogate = self.surrogate
        model_based = [p for p in proposals if p.predicted_mean is not None]
        if not model_based or not isinstance(surrogate, MultiOutputSurrogate) or not surrogate.fitted:
            return proposals
        if self.pool is not None:
            X = torch.tensor([[float(self.pool.index_of(p.key))] for p in model_based], dtype=torch.float64)
        else:
            X = self._space().encode([p.params for p in model_based])
        with torch.no_grad():
            predicted = surrogate.predict_all(X)
        out: dict[str, Proposal] = {}
        first = self.properties[0]
        for j, p in enumerate(model_based):  # the first property: exactly what the proposal reports
            values = {prop: (float(mean[j]), float(std[j])) for prop, (mean, std) in predicted.items()}
            values[first] = (float(p.predicted_mean or 0.0), float(p.predicted_std or 0.0))
            out[p.key] = dataclasses.replace(p, predictions=values)
        return [out.get(p.key, p) for p in proposals]

    def extend_pool(self, *args: Any, **kwargs: Any) -> int:
        """Not with several objectives (the surrogates would need rebuilding per property).

        Raises:
            EngineError: Always.
        """
        raise EngineError("search_space.generate: growing the pool is not supported with several objectives")
