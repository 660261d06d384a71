"""Cost accounting of a multi-fidelity campaign: total cost to reach the discoveries single-fidelity reaches.

Why a separate replay: :func:`sdl.benchmark.replay` counts experiments, and every step is one. With
cheap sources a round may be a batch of computations, which cost a little and discover nothing by
themselves: a discovery is a top candidate *measured* (made and characterised). So this replay keeps,
after every event, the cumulative cost (``measured_cost`` per experiment plus each computation's
cost) and scores both strategies by the cost at which they first hold half of the top set measured
(and by the experiments it took), from the same seeded initial design. The single-fidelity strategy
is the campaign's own GP and acquisition without the sources, replayed by :func:`sdl.benchmark.replay`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdl import benchmark as bmk
from sdl import benchmark_metrics as bm

__all__ = ["CostedRun", "replay_multifidelity", "replay_single_fidelity", "run_fidelity_benchmark"]

logger = logging.getLogger(__name__)

SCHEMA = "sdl.benchmark-fidelity/1"
SINGLE = "single-fidelity"
MULTI = "multi-fidelity"


@dataclass
class CostedRun:
    """One replay with costs.

    Attributes:
        strategy: ``single-fidelity`` or ``multi-fidelity``.
        seed: Seed of the run.
        keys: Measured candidates, in order.
        indices: Their pool rows.
        cost_after: Cumulative cost (experiments and computations) right after each measurement.
        computations_after: Computations done right after each measurement.
        total_cost: Cost at the end of the run.
        computations: Computations done in the run, per source.
        wall_time_s: Wall time of the run.
    """

    strategy: str
    seed: int
    keys: list[str]
    indices: list[int]
    cost_after: list[float]
    computations_after: list[int]
    total_cost: float
    computations: dict[str, int]
    wall_time_s: float


def _half_reached(indices: Sequence[int], top: set[int], need: int) -> bool:
    return sum(1 for i in indices if i in top) >= need


def replay_single_fidelity(
    dataset: bmk.BenchmarkDataset, cfg: Any, seed: int, max_experiments: int, top: np.ndarray,
    *, stop_at_half: bool = True,
) -> CostedRun:
    """The campaign's GP and acquisition on the measured property alone; each experiment costs ``measured_cost``."""
    strat = bmk.Strategy(label=SINGLE, model=cfg.model.name, acquisition=cfg.acquisition.function,
                         model_config=cfg.model, acquisition_config=cfg.acquisition,
                         initial_strategy=cfg.initial_design.strategy)
    engine = bmk.default_engine_factory(dataset, strat, seed, cfg.initial_design.size, cfg.acquisition.batch_size)
    return _replay(SINGLE, engine, dataset, seed, max_experiments, top, float(cfg.fidelities.measured_cost),
                   stop_at_half=stop_at_half)


def replay_multifidelity(
    dataset: bmk.BenchmarkDataset, cfg: Any, seed: int, max_experiments: int, top: np.ndarray,
    *, stop_at_half: bool = True, max_cost: float | None = None, **engine_options: Any,
) -> CostedRun:
    """Run :class:`~sdl.engine.multifidelity.MultiFidelityEngine` over the pool: compute, measure, account.

    Stops after ``max_experiments`` measurements, once ``max_cost`` is spent, or (``stop_at_half``)
    once half the top set is measured. ``engine_options`` go to the engine (e.g. ``model_factory``).
    """
    from sdl.engine.fidelity import build_sources
    from sdl.engine.multifidelity import MultiFidelityEngine

    fid = cfg.fidelities
    objective = cfg.objective.model_copy(update={"property": dataset.target})
    engine = MultiFidelityEngine(
        objective=objective, model=cfg.model, acquisition=cfg.acquisition, seed=seed, pool=dataset.candidate_pool(),
        initial_design=cfg.initial_design, sources=build_sources(fid), measured_cost=fid.measured_cost,
        compute_batch=fid.compute_batch, **engine_options,
    )
    return _replay(MULTI, engine, dataset, seed, max_experiments, top, float(fid.measured_cost),
                   stop_at_half=stop_at_half, max_cost=max_cost)


def _replay(
    name: str, engine: Any, dataset: bmk.BenchmarkDataset, seed: int, max_experiments: int, top: np.ndarray,
    measured_cost: float, *, stop_at_half: bool, max_cost: float | None = None,
) -> CostedRun:
    """Propose, compute (engines with sources), look the measured values up, observe; account every cost."""
    from sdl.engine import Observation

    index_of = {k: i for i, k in enumerate(dataset.ids)}
    need = math.ceil(0.5 * top.size)
    top_set = {int(i) for i in top}
    keys: list[str] = []
    indices: list[int] = []
    measured: set[str] = set()
    cost_after: list[float] = []
    comps_after: list[int] = []
    per_source: dict[str, int] = {s.name: 0 for s in getattr(engine, "sources", [])}
    computing = hasattr(engine, "observe_computed")
    comp_cost = 0.0
    n_comp = 0
    t0 = time.perf_counter()
    while len(keys) < min(max_experiments, dataset.pool_size):
        if max_cost is not None and measured_cost * len(keys) + comp_cost >= max_cost:
            break
        batch = engine.propose()
        if not batch:
            raise bmk.BenchmarkError(f"{name} seed {seed}: engine proposed nothing after {len(keys)} experiments")
        if computing:
            comps = engine.run_computations(batch)
            engine.observe_computed(comps)
            for c in comps:
                per_source[c.source] += 1
            comp_cost = engine.cost_spent - engine.measured_cost * engine.n_observed
            n_comp = engine.n_computed
        obs = []
        for p in batch:
            if getattr(p, "is_computation", False):
                continue
            if p.key not in index_of or p.key in measured:
                raise bmk.BenchmarkError(f"{name} seed {seed}: proposal {p.key!r} is not new or not in the pool")
            i = index_of[p.key]
            obs.append(Observation(key=p.key, value=dataset.measure(i, seed)))
            keys.append(p.key)
            measured.add(p.key)
            indices.append(i)
            # A round's computations ran before its experiments were made.
            cost_after.append(measured_cost * len(keys) + comp_cost)
            comps_after.append(n_comp)
        engine.observe(obs)
        if stop_at_half and _half_reached(indices, top_set, need):
            break
    wall = time.perf_counter() - t0
    total = measured_cost * len(keys) + comp_cost
    logger.info("%s seed %d: %d experiments, %d computations, cost %.2f in %.1f s", name, seed, len(keys), n_comp,
                total, wall)
    return CostedRun(name, seed, keys, indices, cost_after, comps_after, total, per_source, wall)


def _score(runs: Sequence[CostedRun], top: np.ndarray) -> dict[str, Any]:
    m = int(top.size)
    recalls = [bm.recall_curve(r.indices, top) for r in runs]
    to_half = [bm.experiments_to(c, 0.5, m) for c in recalls]
    cost_half = [None if k is None else r.cost_after[k - 1] for r, k in zip(runs, to_half, strict=True)]
    comps_half = [None if k is None else r.computations_after[k - 1] for r, k in zip(runs, to_half, strict=True)]
    return {
        "experiments_to_half": to_half,
        "cost_to_half": cost_half,
        "computations_to_half": comps_half,
        "total_cost": [r.total_cost for r in runs],
        "cumulative_cost": [r.cost_after for r in runs],
        "computations": [r.computations for r in runs],
        "keys": [r.keys for r in runs],
        "wall_time_s": [r.wall_time_s for r in runs],
        "summary": {
            "experiments_to_half": bm.median_iqr(to_half),
            "cost_to_half": bm.median_iqr(cost_half),
            "computations_to_half": bm.median_iqr(comps_half),
            "reached": sum(k is not None for k in to_half),
        },
    }


def run_fidelity_benchmark(
    dataset: bmk.BenchmarkDataset, cfg: Any, seeds: Sequence[int], max_experiments: int, *,
    top_fraction: float = 0.05, progress: Callable[[CostedRun], None] | None = None,
) -> dict[str, Any]:
    """Replay single- and multi-fidelity over every seed; returns the ``results.json`` dict.

    Raises:
        BenchmarkError: The campaign has no ``fidelities:``, or no seeds.
    """
    if cfg.fidelities is None:
        raise bmk.BenchmarkError("the campaign has no fidelities: use the plain benchmark")
    if not seeds:
        raise bmk.BenchmarkError("no seeds given")
    top = bm.top_set(dataset.truth, dataset.goal, top_fraction)
    runs: dict[str, list[CostedRun]] = {SINGLE: [], MULTI: []}
    t0 = time.perf_counter()
    for seed in seeds:
        for name, fn in ((SINGLE, replay_single_fidelity), (MULTI, replay_multifidelity)):
            run = fn(dataset, cfg, int(seed), max_experiments, top)
            runs[name].append(run)
            if progress is not None:
                progress(run)
    scored = {name: _score(r, top) for name, r in runs.items()}
    med_single = scored[SINGLE]["summary"]["cost_to_half"]["median"]
    med_multi = scored[MULTI]["summary"]["cost_to_half"]["median"]
    fid = cfg.fidelities
    return {
        "schema": SCHEMA,
        "dataset": dataset.name,
        "data_file": dataset.source,
        "target": dataset.target,
        "goal": dataset.goal,
        "pool_size": dataset.pool_size,
        "top_fraction": top_fraction,
        "n_top": int(top.size),
        "half_of_top": math.ceil(0.5 * top.size),
        "seeds": [int(s) for s in seeds],
        "max_experiments": int(max_experiments),
        "initial": cfg.initial_design.size,
        "model": cfg.model.name,
        "acquisition": cfg.acquisition.function,
        "fidelities": fid.model_dump(mode="json"),
        "metric_definitions": {
            "cost_to_half": "cumulative cost (measured_cost per experiment + each computation's cost) when half "
            "the top set (best ceil(top_fraction*N) by the measured property) is first measured; null if not reached",
            "experiments_to_half": "experiments (measurements) at that point, initial design included",
        },
        "cost_ratio_median": None if not med_single or med_multi is None else med_multi / med_single,
        "strategies": scored,
        "initial_designs_identical": all(
            set(a.keys[: cfg.initial_design.size]) == set(b.keys[: cfg.initial_design.size])
            for a, b in zip(runs[SINGLE], runs[MULTI], strict=True)
        ),
        "wall_time_s": time.perf_counter() - t0,
    }


def with_fidelities(cfg: Any, **update: Any) -> Any:
    """A copy of a campaign whose ``fidelities`` fields are replaced (tests, sweeps over costs)."""
    return cfg.model_copy(update={"fidelities": cfg.fidelities.model_copy(update=update)})

