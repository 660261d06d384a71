"""The multi-fidelity engine: decide, per round, what to compute cheaply and what to make.

Why a subclass of :class:`~sdl.engine.engine.Engine` and not a new surrogate: a round of this engine
returns two kinds of work (experiments for the lab, computations it runs itself) and learns from
two kinds of results; everything else (the pool, the seeded design, the rules about measured,
pending and excluded keys) is the engine's own and stays there. One round::

    batch = engine.propose()                       # FidelityProposal: source 'measured' or a source name
    engine.observe_computed(engine.run_computations(batch))  # computed sources: no instrument, never experiments
    engine.observe([Observation(p.key, value=lab(p)) for p in batch if not p.is_computation])

The design measures ``initial_design.size`` candidates and computes every source at them (paired
values from the first fit on, so the model can learn how the sources relate). After it, the
multi-task GP (:class:`~sdl.engine.models.multifidelity.MultiFidelityGP`, task 0 = the measured
property) ranks candidates by the campaign's acquisition on task 0, and
:func:`~sdl.engine.fidelity.cost_aware_choice` picks, per ranked candidate, measuring it or computing
a source for it, by information about the measured property per unit cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from sdl.engine.engine import DESIGN, Engine, Proposal
from sdl.engine.fidelity import MEASURED, Computation, ComputedSource, FidelityProposal, cost_aware_choice
from sdl.engine.models.multifidelity import MultiFidelityGP
from sdl.engine.models.surrogate import GPSurrogate, digest
from sdl.engine.objectives import Objective
from sdl.exceptions import EngineError
from sdl.steps import step

__all__ = ["MultiFidelityEngine"]

logger = logging.getLogger(__name__)

_WALK_CHUNK = 64  # ranked candidates whose options are scored at a time


class MultiFidelityEngine(Engine):
    """An :class:`~sdl.engine.engine.Engine` over a pool with cheap computed sources of the objective.

    Args:
        *args: As :class:`~sdl.engine.engine.Engine` (pool mode, model ``gp``).
        sources: The computed sources (:func:`sdl.engine.fidelity.build_sources`).
        measured_cost: Cost of one experiment (the unit the sources' costs are in).
        compute_batch: Most computations proposed per round.
        model_factory: ``(bounds, n_tasks) -> MultiFidelityGP`` (default: its defaults), e.g. fewer
            optimiser iterations.
        **kwargs: As :class:`~sdl.engine.engine.Engine`.

    Raises:
        EngineError: No pool, a model other than ``gp``, no source, or an extensive objective.
    """

    def __init__(
        self, *args: Any, sources: Sequence[ComputedSource], measured_cost: float = 1.0, compute_batch: int = 16,
        model_factory: Callable[[torch.Tensor, int], MultiFidelityGP] = MultiFidelityGP, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.pool is None:
            raise EngineError("fidelities: need a candidate pool (search_space.candidates)")
        if not isinstance(self.surrogate, GPSurrogate):
            raise EngineError(f"fidelities: need model gp (a multi-task GP over the sources), not {self.strategy!r}")
        if self.extensive:
            raise EngineError("fidelities: an extensive objective is not supported (learn it per cell)")
        if not sources:
            raise EngineError("fidelities: need at least one computed source")
        if not measured_cost > 0:
            raise EngineError(f"fidelities.measured_cost must be > 0, got {measured_cost=}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names) or MEASURED in names:
            raise EngineError(f"fidelities.sources: names must be unique and not {MEASURED!r}, got {names}")
        self.sources = list(sources)
        self.measured_cost = float(measured_cost)
        self.compute_batch = max(1, int(compute_batch))
        self._computed: list[dict[int, float]] = [{} for _ in self.sources]
        self._cost_computed = 0.0
        self._mf: MultiFidelityGP | None = None
        self._model_factory = model_factory
        self._mf_data = (-1, -1)
        self._mf_version: str | None = None

    @classmethod
    def from_campaign(cls, cfg: Any, **kwargs: Any) -> Engine:
        """Engine for a campaign with ``fidelities:`` (sources built by :func:`sdl.engine.fidelity.build_sources`)."""
        from sdl.engine.fidelity import build_sources

        fid = cfg.fidelities
        if fid is None:
            raise EngineError("MultiFidelityEngine.from_campaign: the campaign has no fidelities")
        kwargs.setdefault("sources", build_sources(fid, store=kwargs.get("embedding_store")))
        return super().from_campaign(cfg, measured_cost=fid.measured_cost, compute_batch=fid.compute_batch, **kwargs)

    def __repr__(self) -> str:
        return (f"MultiFidelityEngine(sources={self.sources!r}, measured_cost={self.measured_cost:g}, "
                f"n_observed={self.n_observed}, n_computed={self.n_computed})")

    # -- state -------------------------------------------------------------------------------
    @property
    def n_computed(self) -> int:
        """Computed values recorded (every source)."""
        return sum(len(c) for c in self._computed)

    @property
    def cost_spent(self) -> float:
        """Experiments times their cost plus every recorded computation's cost."""
        return self.measured_cost * self.n_observed + self._cost_computed

    @property
    def model_version(self) -> str:
        """``mf-gp-<digest of measurements and computations>`` after a fit; ``design-s<seed>`` before."""
        return self._mf_version or f"design-s{self.seed}"

    @property
    def model(self) -> MultiFidelityGP | None:
        """The multi-task GP of the last fit (None before it)."""
        return self._mf

    def computed(self, source: str) -> dict[str, float]:
        """Candidate key -> computed value of ``source`` (NaN where the source had none)."""
        assert self.pool is not None
        return {self.pool.keys[i]: v for i, v in self._computed[self._source_index(source)].items()}

    def _source_index(self, name: str) -> int:
        for i, s in enumerate(self.sources):
            if s.name == name:
                return i
        raise EngineError(f"unknown fidelity source {name!r}; sources are {[s.name for s in self.sources]}")

    # -- computations ------------------------------------------------------------------------
    def run_computations(self, proposals: Iterable[Proposal]) -> list[Computation]:
        """Run the computations among ``proposals`` (no instrument); the caller records and observes them."""
        pool = self.pool
        assert pool is not None
        by_source: dict[int, list[str]] = {}
        for p in proposals:
            if isinstance(p, FidelityProposal) and p.is_computation:
                by_source.setdefault(self._source_index(p.source), []).append(p.key)
        out: list[Computation] = []
        for t, keys in by_source.items():
            src = self.sources[t]
            step("computing %s for %d candidates", src.name, len(keys))
            values = src.compute(pool, [pool.index_of(k) for k in keys])
            out += [Computation(k, src.name, float(v)) for k, v in zip(keys, values, strict=True)]
        return out

    def observe_computed(self, computations: Iterable[Computation]) -> None:
        """Learn from computed values (a NaN marks a candidate the source has no value for: never asked again).

        Raises:
            EngineError: Unknown candidate or source, or an infinite value.
        """
        pool = self.pool
        assert pool is not None
        new = []
        for c in computations:
            if c.key not in pool:
                raise EngineError(f"computation {c.key!r}: unknown candidate key in {pool.source}")
            value = float(c.value)
            if math.isinf(value):
                raise EngineError(f"computation {c.key!r} of {c.source!r}: value must be finite or NaN, got {value}")
            new.append((self._source_index(c.source), pool.index_of(c.key), value))
        for t, row, value in new:
            if row not in self._computed[t]:
                self._cost_computed += self.sources[t].cost
            self._computed[t][row] = value

    # -- propose -----------------------------------------------------------------------------
    def _propose_pool(
        self, q: int, n_design: int, pending: set[str], exclude: set[str], state_seed: int
    ) -> list[Proposal]:
        pool = self.pool
        assert pool is not None
        if n_design:
            design = super()._propose_pool(q, n_design, pending, exclude, state_seed)
            out: list[Proposal] = [self._with_source(p, 0) for p in design]
            for t in range(len(self.sources)):
                out += [self._with_source(p, t + 1) for p in design if pool.index_of(p.key) not in self._computed[t]]
            return out
        taken = self._measured | pending | exclude
        avail = np.array([i for i, k in enumerate(pool.keys) if k not in taken], dtype=np.int64)
        if avail.size == 0:
            raise EngineError(f"pool exhausted: all {len(pool)} candidates of {pool.source} are measured, pending "
                              f"or excluded")
        mf = self._fit_mf()
        X_all = self.surrogate.inputs()
        mean, std = mf.predict_target(X_all)
        ranked, acq_values = self._rank(mf, X_all, mean, std, avail, pending, state_seed)
        costs = [self.measured_cost, *(s.cost for s in self.sources)]
        picks: list[tuple[int, int]] = []
        n_measure = n_compute = 0
        for start in range(0, len(ranked), _WALK_CHUNK):
            part = ranked[start:start + _WALK_CHUNK]
            info = mf.variance_reduction(X_all[torch.as_tensor(part)]).numpy()
            known = np.array([[False] + [int(r) in c for c in self._computed] for r in part])
            chosen = cost_aware_choice(part.tolist(), info, costs, known, q=q - n_measure,
                                       compute_batch=self.compute_batch - n_compute)
            picks += chosen
            n_measure += sum(1 for _, t in chosen if t == 0)
            n_compute += sum(1 for _, t in chosen if t != 0)
            if n_measure >= q or n_compute >= self.compute_batch:
                break
        keys = [pool.keys[r] for r, _ in picks]
        batch_id = self._batch_id(keys, pending)
        out = []
        for row, t in picks:
            out.append(FidelityProposal(
                key=pool.keys[row], params=pool.params(row), acquisition_value=float(acq_values[row]),
                predicted_mean=float(mean[row]), predicted_std=float(std[row]), model_version=self.model_version,
                batch_id=batch_id, strategy=self.strategy, source=self._source_name(t), cost=costs[t],
            ))
        logger.info("multi-fidelity round: %d measurement(s), %d computation(s)", n_measure, n_compute)
        return out

    def _source_name(self, t: int) -> str:
        return MEASURED if t == 0 else self.sources[t - 1].name

    def _with_source(self, p: Proposal, t: int) -> FidelityProposal:
        cost = self.measured_cost if t == 0 else self.sources[t - 1].cost
        return FidelityProposal(
            key=p.key, params=p.params, acquisition_value=p.acquisition_value, predicted_mean=p.predicted_mean,
            predicted_std=p.predicted_std, model_version=p.model_version, batch_id=p.batch_id,
            strategy=p.strategy if t == 0 else DESIGN, source=self._source_name(t), cost=cost,
        )

    def _fit_mf(self) -> MultiFidelityGP:
        """(Re)condition the multi-task GP when measurements or computations changed since the last fit."""
        state = (len(self._obs), self.n_computed)
        if self._mf is not None and state == self._mf_data:
            return self._mf
        X_all = self.surrogate.inputs()
        if self._mf is None:
            bounds = torch.stack([X_all.min(dim=0).values, X_all.max(dim=0).values])
            self._mf = self._model_factory(bounds, 1 + len(self.sources))
        rows = list(self._obs_index)
        tasks = [0] * len(rows)
        values = [o.value for o in self._obs]
        for t, comp in enumerate(self._computed):
            for row, v in comp.items():
                if math.isfinite(v):
                    rows.append(row)
                    tasks.append(t + 1)
                    values.append(v)
        step("fitting the multi-fidelity GP on %d measurements and %d computed values", state[0],
             len(rows) - state[0])
        try:
            self._mf.fit(X_all[torch.as_tensor(rows)], torch.as_tensor(tasks),
                         torch.as_tensor(values, dtype=torch.float64))
        except ValueError as exc:
            raise EngineError(f"multi-fidelity model: {exc}") from exc
        self._mf_data = state
        pairs = [(self.pool.keys[r] if self.pool is not None else r, t, round(v, 12))
                 for r, t, v in zip(rows, tasks, values, strict=True)]
        self._mf_version = f"mf-gp-{digest('mf-gp', self.seed, pairs, n=10)}"
        return self._mf

    def _rank(
        self, mf: MultiFidelityGP, X_all: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, avail: np.ndarray,
        pending: set[str], seed: int,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Available rows by the campaign's acquisition on the measured task (best first) and the value per row."""
        from sdl.engine.acquisition import build_acquisition
        from sdl.engine.engine import top_k_indices

        assert self.pool is not None
        a = torch.as_tensor(avail)
        short = avail
        if avail.size > self.prefilter_k:
            short = avail[top_k_indices(self.objective.optimistic(mean[a], std[a], self.beta), self.prefilter_k)]
        objective = self._standardised_objective(mf)
        y_std = (torch.tensor([o.value for o in self._obs], dtype=torch.float64) - mf.mean[0]) / mf.std[0]
        pending_rows = sorted(self.pool.index_of(k) for k in pending if k in self.pool)
        X_pending = X_all[torch.as_tensor(pending_rows, dtype=torch.long)] if pending_rows else None
        acqf = build_acquisition(
            self.acquisition_name, mf.model, objective, X_baseline=X_all[torch.as_tensor(sorted(set(self._obs_index)))],
            y_baseline=y_std, X_pending=X_pending, beta=self.beta, seed=seed,
        )
        values = torch.full((len(self.pool),), -math.inf, dtype=torch.float64)
        with torch.no_grad():
            for part in np.array_split(short, max(1, math.ceil(short.size / self.chunk_size))):
                idx = torch.as_tensor(part)
                values[idx] = acqf(X_all[idx].unsqueeze(1)).to(torch.float64)
        order = np.argsort(-values[torch.as_tensor(short)].numpy(), kind="stable")
        ranked: np.ndarray = short[order]
        return ranked, values

    def _standardised_objective(self, mf: MultiFidelityGP) -> Objective:
        """The objective in the measured task's standardised units (the GP's own), for the acquisition."""
        o = self.objective
        if o.target_range is None:
            return o
        m, s = float(mf.mean[0]), float(mf.std[0])
        return Objective(goal=o.goal, target_range=((o.target_range[0] - m) / s, (o.target_range[1] - m) / s),
                         property=o.property, unit=o.unit)
