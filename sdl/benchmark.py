"""Pool replay benchmarks: run the real engine over a recorded dataset and score it.

Why replay: a recorded dataset is a lab whose every experiment has already been done. The engine
proposes only rows of the dataset (pool mode), the "measurement" is a recorded value, and the
question "how many experiments did it need to find the best designs?" gets an honest answer with
many seeds in minutes. Metrics live in :mod:`sdl.benchmark_metrics`, figures in :mod:`sdl.plots`.

Two dataset formats, no code needed for a new one:

- table CSV: parameter columns + a target column. Rows with equal parameters are replicates of one
  design; the pool is the unique designs, a measurement returns one real replicate drawn at random
  (seeded per seed and design, so every strategy sees the same draw), and the ground truth that
  defines the top set is the per-design mean (Liang et al. 2021 group by design and take the mean).
- crystal CSV(.gz): one row per crystal with a structure column (CIF) and the target; the pool is
  the rows, the measurement and the truth are the row's value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from sdl import benchmark_metrics as bm
from sdl.exceptions import SDLError

__all__ = [
    "BenchmarkError",
    "BenchmarkDataset",
    "ReplayRun",
    "Strategy",
    "load_table_dataset",
    "load_crystal_dataset",
    "parse_strategies",
    "apply_synthesis_rule",
    "replay",
    "run_benchmark",
    "write_outputs",
]

logger = logging.getLogger(__name__)

SCHEMA = "sdl.benchmark/1"
DEFAULT_ACQUISITION = "qlognei"


class BenchmarkError(SDLError, ValueError):
    """Bad benchmark input (missing column, empty pool, unknown strategy); the message names it."""


@dataclass
class BenchmarkDataset:
    """A recorded dataset prepared as a candidate pool with ground truth.

    Attributes:
        name: Short name (file stem) used in titles.
        source: The data file as given.
        target: Target column.
        goal: ``"max"`` or ``"min"``.
        mode: ``"table"`` or ``"crystal"``.
        ids: Candidate key per pool row, ``[N]``.
        truth: Ground-truth value per pool row (per-design mean for tables), ``[N]``.
        replicates: Real recorded values per pool row (one or more).
        pool_csv: CSV the engine's :class:`sdl.engine.space.CandidatePool` is read from (no target column).
        id_column: Id column of ``pool_csv``.
        parameter_columns: Table mode: the design parameters.
        structure_column: Crystal mode: the CIF column.
        n_rows: Rows in the source file (after dropping rows with a missing target).
        extensive: The target scales with the crystal's cell (``objective.extensive``).
        feasible: ``[N]`` whether the synthesis of each row succeeds (None: every one does); a
            replay fails the others (one experiment spent, no value) and the top set is drawn from
            the feasible rows only (:func:`apply_synthesis_rule`).
        synthesis_rule: What decided ``feasible`` (its repr).
    """

    name: str
    source: str
    target: str
    goal: str
    mode: str
    ids: list[str]
    truth: np.ndarray
    replicates: list[np.ndarray]
    pool_csv: Path
    id_column: str
    parameter_columns: list[str] | None = None
    structure_column: str | None = None
    n_rows: int = 0
    params: list[dict[str, Any]] = field(default_factory=list)
    formula_column: str | None = None
    extensive: bool = False
    objectives: Any = None  # several objectives: a sdl.engine.pareto.MultiObjective (sdl.benchmark_pareto)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the other properties' values per pool row
    extensive_by: dict[str, bool] = field(default_factory=dict)
    feasible: np.ndarray | None = None
    synthesis_rule: str | None = None
    _pool: Any = field(default=None, repr=False)

    def candidate_pool(self) -> Any:
        """The engine's :class:`sdl.engine.space.CandidatePool`, read once and shared by every replay.

        Sharing matters for crystals: parsed structures (and graphs cached on them) are reused.
        """
        if self._pool is None:
            from sdl.engine.space import CandidatePool

            if self.mode == "table":
                self._pool = CandidatePool.from_csv(
                    self.pool_csv, id_column=self.id_column, parameter_columns=self.parameter_columns
                )
            else:
                self._pool = CandidatePool.from_csv(
                    self.pool_csv,
                    id_column=self.id_column,
                    structure_column=self.structure_column,
                    formula_column=self.formula_column,
                )
            if list(self._pool.keys) != self.ids:
                raise BenchmarkError(f"{self.pool_csv}: candidate pool keys differ from the benchmark's ids")
        return self._pool

    def measure_values(self, index: int) -> dict[str, float]:
        """The other properties' recorded values for pool row ``index`` (several objectives; NaN left out)."""
        return {p: float(v[index]) for p, v in self.extra.items() if math.isfinite(float(v[index]))}

    @property
    def pool_size(self) -> int:
        """Number of candidates ``N``."""
        return len(self.ids)

    def measure(self, index: int, seed: int) -> float:
        """One real recorded value for pool row ``index``; the replicate is fixed by (seed, index)."""
        reps = self.replicates[index]
        if reps.size == 1:
            return float(reps[0])
        rng = np.random.default_rng([int(seed), int(index), 0x5D1])
        return float(reps[rng.integers(reps.size)])


@dataclass(frozen=True)
class Strategy:
    """One benchmarked strategy: a model name and an acquisition function name.

    ``model_config`` / ``acquisition_config`` (``sdl.config`` objects) carry a campaign YAML's
    options; None means the engine's defaults (what the README benchmarks).
    """

    label: str
    model: str
    acquisition: str
    model_config: Any = None
    acquisition_config: Any = None
    initial_strategy: str = "random"
    feasibility: str | None = None
    """``acquisition.feasibility`` override (``off`` for the feasibility-blind ``model:blind``)."""


@dataclass
class ReplayRun:
    """What one (strategy, seed) replay measured, in order."""

    strategy: str
    seed: int
    keys: list[str]
    indices: list[int]
    measured: list[float]
    truth: list[float]
    wall_time_s: float
    propose_time_s: float
    failed: list[bool] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# datasets


def _read_csv(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    if not path.exists():
        raise BenchmarkError(f"{path}: data file not found")
    try:
        if columns:
            return pd.read_csv(path, header=None, names=list(columns), encoding="utf-8-sig")
        return pd.read_csv(path, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise BenchmarkError(f"{path}: cannot read as CSV: {exc}") from exc


def _require_columns(df: pd.DataFrame, path: Path, wanted: Sequence[str], what: str) -> None:
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise BenchmarkError(
            f"{path}: {what} column(s) {', '.join(repr(c) for c in missing)} not found; "
            f"columns are {', '.join(repr(c) for c in df.columns)}"
        )


def _normalise_goal(goal: str) -> str:
    g = goal.strip().lower()
    if g in ("max", "maximize", "maximise"):
        return "max"
    if g in ("min", "minimize", "minimise"):
        return "min"
    raise BenchmarkError(f"goal must be 'max' or 'min', got {goal!r}")


def _work_dir(work_dir: Path | None) -> Path:
    if work_dir is None:
        import tempfile

        work_dir = Path(tempfile.mkdtemp(prefix="sdl-benchmark-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def load_table_dataset(
    path: str | Path,
    target: str,
    goal: str,
    parameter_columns: Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    work_dir: Path | None = None,
) -> BenchmarkDataset:
    """Group a table CSV by its parameter columns into a pool of unique designs.

    Args:
        path: CSV file (a UTF-8 BOM is tolerated).
        target: Target column.
        goal: ``max`` or ``min``.
        parameter_columns: Design parameters (numeric).
        columns: Column names for a CSV without a header row (e.g. Olympus ``data.csv``).
        work_dir: Where the pool CSV is written (a temporary folder by default).
    """
    p = Path(path)
    df = _read_csv(p, columns)
    _require_columns(df, p, [target], "target")
    _require_columns(df, p, parameter_columns, "parameter")
    if target in parameter_columns:
        raise BenchmarkError(f"{p}: target {target!r} is also listed as a parameter")
    sub = df[[*parameter_columns, target]].copy()
    for col in [*parameter_columns, target]:
        if not pd.api.types.is_numeric_dtype(sub[col]):
            raise BenchmarkError(f"{p}: column {col!r} is not numeric (table benchmarks need numeric parameters)")
    sub = sub.dropna(subset=[target])
    if sub[list(parameter_columns)].isna().any().any():
        raise BenchmarkError(f"{p}: parameter columns have missing values")
    if sub.empty:
        raise BenchmarkError(f"{p}: no rows with a value in {target!r}")
    grouped = sub.groupby(list(parameter_columns), sort=True, dropna=False)[target]
    truth = grouped.mean()
    reps = grouped.apply(lambda s: s.to_numpy(dtype=float))
    designs = truth.index.to_frame(index=False)
    ids = [f"d{i:05d}" for i in range(len(designs))]
    pool = designs.copy()
    pool.insert(0, "id", ids)
    wd = _work_dir(work_dir)
    pool_csv = wd / "pool.csv"
    pool.to_csv(pool_csv, index=False)
    params = [
        {c: _py(v) for c, v in zip(parameter_columns, row, strict=True)} for row in designs.itertuples(index=False)
    ]
    logger.info("%s: %d rows -> %d designs", p, len(sub), len(ids))
    return BenchmarkDataset(
        name=_stem(p),
        source=str(path),
        target=target,
        goal=_normalise_goal(goal),
        mode="table",
        ids=ids,
        truth=truth.to_numpy(dtype=float),
        replicates=[np.asarray(r, dtype=float) for r in reps.tolist()],
        pool_csv=pool_csv,
        id_column="id",
        parameter_columns=list(parameter_columns),
        n_rows=len(sub),
        params=params,
    )


def load_crystal_dataset(
    path: str | Path,
    target: str,
    goal: str,
    structure_column: str = "cif",
    *,
    id_column: str | None = "id",
    formula_column: str | None = "formula",
    work_dir: Path | None = None,
) -> BenchmarkDataset:
    """Read a crystal CSV(.gz): one candidate per row, its value is the truth and the measurement.

    Args:
        path: CSV or CSV.gz with a structure (CIF) column.
        target: Target column.
        goal: ``max`` or ``min``.
        structure_column: Column with the CIF text.
        id_column: Unique id column; None (or absent and not asked for) numbers the rows.
        formula_column: Formula column used by composition models if present (else formulas come
            from the structures).
        work_dir: Where a pool CSV is written if the file needs ids or has rows without a target.
    """
    p = Path(path)
    df = _read_csv(p)
    _require_columns(df, p, [target], "target")
    _require_columns(df, p, [structure_column], "structure")
    if id_column is not None and id_column not in df.columns and id_column != "id":
        _require_columns(df, p, [id_column], "id")
    if not pd.api.types.is_numeric_dtype(df[target]):
        raise BenchmarkError(f"{p}: target column {target!r} is not numeric")
    n_all = len(df)
    df = df.dropna(subset=[target, structure_column])
    if df.empty:
        raise BenchmarkError(f"{p}: no rows with both {target!r} and {structure_column!r}")
    needs_copy = len(df) != n_all
    if id_column is None or id_column not in df.columns:
        id_column = "id"
        df = df.copy()
        df.insert(0, "id", [f"row{i:06d}" for i in range(len(df))])
        needs_copy = True
    ids = [str(x) for x in df[id_column].tolist()]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{p}: id column {id_column!r} has duplicate values")
    pool_csv = p
    if needs_copy:
        wd = _work_dir(work_dir)
        pool_csv = wd / "pool.csv.gz"
        df.drop(columns=[target]).to_csv(pool_csv, index=False)
    truth = df[target].to_numpy(dtype=float)
    return BenchmarkDataset(
        name=_stem(p),
        source=str(path),
        target=target,
        goal=_normalise_goal(goal),
        mode="crystal",
        ids=ids,
        truth=truth,
        replicates=[np.array([v]) for v in truth],
        pool_csv=pool_csv,
        id_column=id_column,
        structure_column=structure_column,
        n_rows=len(df),
        params=[{} for _ in ids],
        formula_column=formula_column if formula_column and formula_column in df.columns else None,
    )


def apply_synthesis_rule(dataset: BenchmarkDataset, rule: Any) -> BenchmarkDataset:
    """Mark the rows whose synthesis fails under ``rule`` (``judge_cif(cif).ok``, e.g.
    :class:`simulators.synthesis_rules.ToleranceFactorRule`), as the simulated robot fails them.

    Raises:
        BenchmarkError: A table dataset (the rule judges crystals).
    """
    if dataset.mode != "crystal":
        raise BenchmarkError(f"{dataset.source}: a synthesis rule judges crystal structures; this is a table")
    texts = dataset.candidate_pool().structure_texts()
    ok = []
    for text in texts:
        try:
            ok.append(bool(rule.judge_cif(text).ok))
        except ValueError:  # not a structure the rule judges: the robot makes it (see SimulatedInstruments)
            ok.append(True)
    dataset.feasible = np.asarray(ok, dtype=bool)
    dataset.synthesis_rule = repr(rule)
    logger.info("%s: %d of %d designs fail under %r", dataset.name, int((~dataset.feasible).sum()),
                dataset.pool_size, rule)
    return dataset


# --------------------------------------------------------------------------------------------------
# strategies and the engine


_MODELS = ("random", "gp", "gnn-ensemble", "gnn-mlp", "gnn-scratch")
#: Benchmark labels that are variants of the crystal model (``model.options`` overrides).
_GNN_VARIANTS = {"gnn-ensemble": {}, "gnn-mlp": {"head": "mlp"}, "gnn-scratch": {"backbone": "scratch"}}
_ACQUISITIONS = ("qlogei", "qlognei", "qucb", "max-variance", "thompson")


MODEL_DEFAULT_ACQUISITION = {"random": "qlognei", "gp": "qlognei", "gnn-ensemble": "qucb", "gnn-mlp": "qucb",
                             "gnn-scratch": "qucb"}


def parse_strategies(spec: str | Sequence[str], default_acquisition: str | None = None) -> list[Strategy]:
    """Parse ``"random,gp,gp:qucb,gnn-ensemble,gnn-ensemble:blind"`` into strategies (model[:acquisition][:blind]).

    ``blind`` turns the feasibility model off (``acquisition.feasibility: off``): failed syntheses
    only leave the candidates, the baseline the feasibility model is measured against.

    Without ``default_acquisition`` each model gets the engine's recommended default
    (``qlognei`` for the GP, ``qucb`` for the GNN ensemble, see ``sdl.config.Acquisition``).
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise BenchmarkError("no strategies given (e.g. --strategies random,gp)")
    if default_acquisition is not None and default_acquisition not in _ACQUISITIONS:
        raise BenchmarkError(f"unknown acquisition {default_acquisition!r}; choose from {', '.join(_ACQUISITIONS)}")
    out: list[Strategy] = []
    for item in items:
        model, _, rest = item.partition(":")
        tags = [t for t in rest.split(":") if t] if rest else []
        blind = "blind" in tags
        acq = next((t for t in tags if t != "blind"), "")
        if len([t for t in tags if t != "blind"]) > 1 or tags.count("blind") > 1:
            raise BenchmarkError(f"strategy {item!r}: expected model[:acquisition][:blind]")
        if blind and model == "random":
            raise BenchmarkError(f"strategy {item!r}: random has no feasibility model to blind")
        if model not in _MODELS:
            raise BenchmarkError(
                f"unknown strategy {item!r}; models are {', '.join(_MODELS)} (optionally model:acquisition)"
            )
        if acq and acq not in _ACQUISITIONS:
            raise BenchmarkError(f"unknown acquisition in strategy {item!r}; choose from {', '.join(_ACQUISITIONS)}")
        acquisition = acq or default_acquisition or MODEL_DEFAULT_ACQUISITION[model]
        label = model if (model == "random" or not acq) else f"{model}:{acq}"
        label += ":blind" if blind else ""
        if any(s.label == label for s in out):
            raise BenchmarkError(f"strategy {label!r} listed twice")
        out.append(Strategy(label=label, model=model, acquisition=acquisition, feasibility="off" if blind else None))
    return out


def default_engine_factory(
    dataset: BenchmarkDataset, strategy: Strategy, seed: int, initial: int, batch_size: int, *, compute: Any = None
) -> Any:
    """Build an :class:`sdl.engine.Engine` in pool mode with the engine's default settings.

    ``compute``: a :class:`sdl.engine.distributed.DaskCompute` that featurises and scores the pool
    (``sdl benchmark --dask``), shared by every seed and strategy; None: in this process.
    """
    from sdl import config as cfgmod
    from sdl.engine import Engine

    pool = dataset.candidate_pool()
    goal: Literal["maximize", "minimize"] = "maximize" if dataset.goal == "max" else "minimize"
    objective = cfgmod.ObjectiveSpec(property=dataset.target, unit="", goal=goal, extensive=dataset.extensive)
    if strategy.model_config is not None:
        model: Any = strategy.model_config
    elif strategy.model in _GNN_VARIANTS:
        model = cfgmod.GNNEnsembleModel(
            name="gnn-ensemble", options=cfgmod.GNNEnsembleOptions.model_validate(_GNN_VARIANTS[strategy.model])
        )
    else:
        model = {"random": cfgmod.RandomModel, "gp": cfgmod.GPModel}[strategy.model](name=strategy.model)
    feasibility = {"feasibility": strategy.feasibility} if strategy.feasibility is not None else {}
    if strategy.acquisition_config is not None:
        acquisition = strategy.acquisition_config.model_copy(
            update={"function": strategy.acquisition, "batch_size": batch_size, **feasibility}
        )
    else:
        # The names are plain strings (checked by parse_strategies); the config models check them again.
        acquisition = cfgmod.Acquisition.model_validate(
            {"function": strategy.acquisition, "batch_size": batch_size, **feasibility})
    initial_design = cfgmod.InitialDesign.model_validate({"strategy": strategy.initial_strategy, "size": initial})
    if dataset.objectives is not None:
        from sdl.engine.multi_objective import MultiObjectiveEngine

        return MultiObjectiveEngine(dataset.objectives, model, acquisition, extensive=dataset.extensive_by,
                                    seed=seed, pool=pool, initial_design=initial_design)
    return Engine(
        objective=objective,
        model=model,
        acquisition=acquisition,
        seed=seed,
        pool=pool,
        initial_design=initial_design,
        compute=compute,
    )


EngineFactory = Callable[[BenchmarkDataset, Strategy, int, int, int], Any]


def replay(
    dataset: BenchmarkDataset,
    strategy: Strategy,
    seed: int,
    budget: int,
    *,
    initial: int = 2,
    batch_size: int = 1,
    engine_factory: EngineFactory = default_engine_factory,
) -> ReplayRun:
    """Run one campaign over the pool: propose, look the value up, observe, until the budget is spent.

    Raises:
        BenchmarkError: if the engine proposes a key outside the pool or one already measured.
    """
    from sdl.engine import Observation

    budget = min(int(budget), dataset.pool_size)
    index_of = {k: i for i, k in enumerate(dataset.ids)}
    engine = engine_factory(dataset, strategy, seed, initial, batch_size)
    keys: list[str] = []
    indices: list[int] = []
    measured: list[float] = []
    failed: list[bool] = []
    seen: set[str] = set()
    t0 = time.perf_counter()
    t_prop = 0.0
    while len(keys) < budget:
        q = min(batch_size, budget - len(keys))
        tp = time.perf_counter()
        proposals = engine.propose(q=q)
        t_prop += time.perf_counter() - tp
        if not proposals:
            raise BenchmarkError(f"{strategy.label} seed {seed}: engine proposed nothing after {len(keys)} experiments")
        obs = []
        lost: list[str] = []
        for prop in proposals[:q]:
            key = str(prop.key)
            # Every proposal must be a pool row and new: the replay is meaningless otherwise.
            if key not in index_of:
                raise BenchmarkError(f"{strategy.label} seed {seed}: proposal {key!r} is not a row of the pool")
            if key in seen:
                raise BenchmarkError(f"{strategy.label} seed {seed}: proposal {key!r} was already measured")
            i = index_of[key]
            seen.add(key)
            keys.append(key)
            indices.append(i)
            if dataset.feasible is not None and not dataset.feasible[i]:  # the synthesis fails: no value
                failed.append(True)
                measured.append(math.nan)
                lost.append(key)
                continue
            value = dataset.measure(i, seed)
            failed.append(False)
            measured.append(value)
            obs.append(Observation(key=key, params=dict(dataset.params[i]) if dataset.params else {}, value=value,
                                   values=dataset.measure_values(i)))
        engine.observe(obs)
        if lost:
            engine.observe_failures(lost)
    wall = time.perf_counter() - t0
    logger.info("%s seed %d: %d experiments in %.1f s", strategy.label, seed, len(keys), wall)
    return ReplayRun(
        strategy=strategy.label,
        seed=seed,
        keys=keys,
        indices=indices,
        measured=measured,
        truth=[math.nan if f else float(dataset.truth[i]) for i, f in zip(indices, failed, strict=True)],
        wall_time_s=wall,
        propose_time_s=t_prop,
        failed=failed,
    )


# --------------------------------------------------------------------------------------------------
# the whole benchmark


def run_benchmark(
    dataset: BenchmarkDataset,
    strategies: Sequence[Strategy],
    seeds: Sequence[int],
    budget: int,
    *,
    top_fraction: float = 0.05,
    initial: int = 2,
    batch_size: int = 1,
    engine_factory: EngineFactory = default_engine_factory,
    progress: Callable[[str, int, ReplayRun], None] | None = None,
) -> dict[str, Any]:
    """Replay every strategy over every seed and score the runs; returns the ``results.json`` dict.

    ``best_so_far`` is the best *ground-truth* (per-design mean) value among the designs measured so
    far, so that a lucky replicate does not count as a find.
    """
    if not seeds:
        raise BenchmarkError("no seeds given")
    n = dataset.pool_size
    if n < 2:
        raise BenchmarkError(f"{dataset.source}: pool has {n} design(s); a benchmark needs at least 2")
    budget_eff = min(int(budget), n)
    if budget_eff < 1:
        raise BenchmarkError(f"budget must be at least 1, got {budget}")
    if initial >= budget_eff:
        raise BenchmarkError(f"initial design ({initial}) must be smaller than the budget ({budget_eff})")
    # Also report the other standard fraction (5 % / 1 %) where its top set has at least 5 designs.
    fractions = [top_fraction] + [
        f for f in (0.05, 0.01) if not math.isclose(f, top_fraction) and bm.top_count(n, f) >= 5
    ]
    # With a synthesis rule only what can be made can be found: the top set is drawn from the feasible rows.
    rows = np.arange(n) if dataset.feasible is None else np.flatnonzero(dataset.feasible)
    if rows.size < 2:
        raise BenchmarkError(f"{dataset.source}: {rows.size} feasible design(s) under {dataset.synthesis_rule}")
    reachable = dataset.truth[rows]
    tops = {f: rows[bm.top_set(reachable, dataset.goal, f)] for f in fractions}
    pareto: tuple[np.ndarray, np.ndarray, float] | None = None
    if dataset.objectives is not None:  # the top set is the pool's true Pareto front
        from sdl.benchmark_pareto import pool_front

        pareto = pool_front(dataset)
        fractions, tops = [top_fraction], {top_fraction: pareto[0]}
    best_in_pool = float(reachable.max() if dataset.goal == "max" else reachable.min())

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "dataset": dataset.name,
        "data_file": dataset.source,
        "mode": dataset.mode,
        "target": dataset.target,
        "goal": dataset.goal,
        "parameter_columns": dataset.parameter_columns,
        "structure_column": dataset.structure_column,
        "extensive": dataset.extensive,
        "n_rows": dataset.n_rows,
        "pool_size": n,
        "top_fraction": top_fraction,
        "n_top": int(tops[top_fraction].size),
        "top_fractions": {f"{f:g}": int(tops[f].size) for f in fractions},
        "budget": budget_eff,
        "budget_requested": int(budget),
        "seeds": [int(s) for s in seeds],
        "initial": initial,
        "batch_size": batch_size,
        "best_in_pool": best_in_pool,
        "synthesis_rule": dataset.synthesis_rule,
        "n_infeasible": None if dataset.feasible is None else int((~dataset.feasible).sum()),
        "metric_definitions": {
            "recall": "top designs found / M after each experiment; "
            "top set = best ceil(top_fraction*N) by per-design mean",
            "experiments_to_half": "first experiment with >= ceil(0.5*M) top designs found "
            "(initial design included); null if not reached",
            "experiments_to_all": "first experiment with all M top designs found; null if not reached",
            "ef": "EF(i) = median recall(i) / (i/N) (analytic random)",
            "af": "AF = k(N+1)/(M+1) / median experiments to find k = ceil(level*M) (analytic random)",
            "best_so_far": "best per-design mean value among the designs measured so far",
            "failures": "failed experiments (synthesis rule) per seed within the budget; each costs one "
            "experiment and gives no value",
        },
        "strategies": {},
    }
    if pareto is not None:
        results["objectives"] = {
            "properties": dataset.objectives.properties, "objectives": [
                {"property": o.property, "goal": o.goal, "target_range": o.target_range}
                for o in dataset.objectives.objectives],
            "constraints": [str(c) for c in dataset.objectives.constraints],
            "reference_point": dataset.objectives.reference_point, "reference_utility": pareto[1].tolist(),
            "pool_front": [dataset.ids[i] for i in pareto[0]], "pool_hypervolume": pareto[2],
        }
        results["metric_definitions"]["recall"] = ("pool Pareto-front designs found / M after each experiment; "
                                                   "top set = the pool's true feasible Pareto front")
        results["metric_definitions"]["hypervolume"] = (
            "hypervolume of the feasible measured designs (recorded values) / the pool front's, same reference "
            "point (reference_point, else inferred from the pool front), after each experiment")
    t_all = time.perf_counter()
    for strat in strategies:
        runs: list[ReplayRun] = []
        for seed in seeds:
            run = replay(
                dataset, strat, int(seed), budget_eff,
                initial=initial, batch_size=batch_size, engine_factory=engine_factory,
            )
            runs.append(run)
            if progress is not None:
                progress(strat.label, int(seed), run)
        results["strategies"][strat.label] = score_runs(runs, dataset, tops, top_fraction, strat)
        if pareto is not None:
            from sdl.benchmark_pareto import hypervolume_curves, hypervolume_summary

            curves = hypervolume_curves([r.indices for r in runs], dataset, pareto[1], pareto[2])
            results["strategies"][strat.label]["hypervolume"] = curves
            results["strategies"][strat.label]["summary"].update(
                hypervolume_summary(curves, at=sorted({initial, budget_eff // 4, budget_eff // 2, budget_eff})))
    results["wall_time_s"] = time.perf_counter() - t_all
    results["initial_designs_identical"] = _initial_designs_identical(results, initial)
    return results


def score_runs(
    runs: Sequence[ReplayRun],
    dataset: BenchmarkDataset,
    tops: dict[float, np.ndarray],
    top_fraction: float,
    strategy: Strategy,
) -> dict[str, Any]:
    """Per-seed curves and summary statistics for one strategy."""
    n = dataset.pool_size
    top = tops[top_fraction]
    m = int(top.size)
    recalls = [bm.recall_curve(r.indices, top) for r in runs]
    # A failed experiment found nothing: it counts as the worst design of the pool in best-so-far.
    worst = float(dataset.truth.min() if dataset.goal == "max" else dataset.truth.max())
    best = [bm.best_so_far(np.nan_to_num(np.asarray(r.truth, dtype=float), nan=worst), dataset.goal) for r in runs]
    summary = bm.summarize_strategy(recalls, best, n, m)
    out: dict[str, Any] = {
        "model": strategy.model,
        "acquisition": None if strategy.model == "random" else strategy.acquisition,
        "recall": [c.tolist() for c in recalls],
        "experiments_to_half": [bm.experiments_to(c, 0.5, m) for c in recalls],
        "experiments_to_all": [bm.experiments_to(c, 1.0, m) for c in recalls],
        "best_so_far": [b.tolist() for b in best],
        "failures": [int(sum(r.failed)) for r in runs],
        "failures_median": float(np.median([sum(r.failed) for r in runs])) if runs else None,
        "keys": [r.keys for r in runs],
        "measured": [r.measured for r in runs],
        "wall_time_s": [r.wall_time_s for r in runs],
        "propose_time_s": [r.propose_time_s for r in runs],
        "summary": summary,
        "other_top_fractions": {},
    }
    for f, t in tops.items():
        if f == top_fraction:
            continue
        rc = [bm.recall_curve(r.indices, t) for r in runs]
        s = bm.summarize_strategy(rc, best, n, int(t.size))
        out["other_top_fractions"][f"{f:g}"] = {
            "n_top": int(t.size),
            "recall": [c.tolist() for c in rc],
            "experiments_to_half": s["levels"]["0.5"]["experiments"],
            "experiments_to_all": s["levels"]["1"]["experiments"],
            "summary": {k: v for k, v in s.items() if not k.startswith("best_so_far")},
        }
    return out


def _initial_designs_identical(results: dict[str, Any], initial: int) -> bool:
    """True if, for every seed, all strategies started from the same set of initial keys."""
    strategies = list(results["strategies"].values())
    if len(strategies) < 2 or initial <= 0:
        return True
    for s_idx in range(len(results["seeds"])):
        firsts = {frozenset(s["keys"][s_idx][:initial]) for s in strategies}
        if len(firsts) != 1:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# outputs


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``recall.png`` (and ``recall_top1.png``) and ``best_so_far.png``."""
    from sdl import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["results"] = out / "results.json"
    paths["results"].write_text(json.dumps(results, indent=1, default=_py) + "\n")
    title = (
        f"{results['dataset']}: {results['target']} ({results['goal']}), N = {results['pool_size']}, "
        f"{len(results['seeds'])} seeds"
    )
    curves = {
        name: {
            "median": s["summary"]["recall_median"],
            "q25": s["summary"]["recall_q25"],
            "q75": s["summary"]["recall_q75"],
        }
        for name, s in results["strategies"].items()
    }
    paths["recall"] = plots.plot_recall_curves(
        curves,
        out / "recall.png",
        pool_size=results["pool_size"],
        n_top=results["n_top"],
        title=f"{title}, top {results['top_fraction'] * 100:g} %",
    )
    for f, m in results["top_fractions"].items():
        if float(f) == results["top_fraction"]:
            continue
        c2 = {}
        for name, s in results["strategies"].items():
            o = s["other_top_fractions"][f]["summary"]
            c2[name] = {"median": o["recall_median"], "q25": o["recall_q25"], "q75": o["recall_q75"]}
        tag = f"{float(f) * 100:g}".replace(".", "p")
        paths[f"recall_top{tag}"] = plots.plot_recall_curves(
            c2, out / f"recall_top{tag}.png",
            pool_size=results["pool_size"], n_top=m, title=f"{title}, top {float(f) * 100:g} %",
        )
    best = {
        name: {
            "median": s["summary"]["best_so_far_median"],
            "q25": s["summary"]["best_so_far_q25"],
            "q75": s["summary"]["best_so_far_q75"],
        }
        for name, s in results["strategies"].items()
    }
    if "objectives" in results:
        hv = {name: {"median": s["summary"]["hypervolume_median"], "q25": s["summary"]["hypervolume_q25"],
                     "q75": s["summary"]["hypervolume_q75"]} for name, s in results["strategies"].items()}
        paths["hypervolume"] = plots.plot_hypervolume_curves(
            hv, out / "hypervolume.png", title=f"{results['dataset']}: " + ", ".join(
                f"{o['goal']} {o['property']}" for o in results["objectives"]["objectives"])
            + f", {len(results['seeds'])} seeds")
    paths["best_so_far"] = plots.plot_best_so_far_curves(
        best, out / "best_so_far.png",
        goal_value=results["best_in_pool"], ylabel=f"best {results['target']} so far", title=title,
    )
    return paths


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per strategy for the terminal table and SUMMARY.md (median [IQR])."""
    rows = []
    n_budget = results["budget"]
    for name, s in results["strategies"].items():
        lv = s["summary"]["levels"]
        half, full = lv["0.5"], lv["1"]
        rows.append(
            {
                "strategy": name,
                "to_half": _fmt_stats(half["experiments_stats"]),
                "to_half_reached": f"{half['experiments_stats']['reached']}/{half['experiments_stats']['n']}",
                "random_half": half["random_expected"],
                "af_half": half["af_median"],
                "to_all": _fmt_stats(full["experiments_stats"]),
                "to_all_reached": f"{full['experiments_stats']['reached']}/{full['experiments_stats']['n']}",
                "random_all": full["random_expected"],
                "af_all": full["af_median"],
                "recall_at_budget": s["summary"]["recall_median"][n_budget - 1],
                "ef_at_budget": s["summary"]["ef_median"][n_budget - 1],
                "best_at_budget": s["summary"]["best_so_far_median"][n_budget - 1],
                "seconds_per_seed": float(np.median(s["wall_time_s"])),
                "failures": _fmt_stats(bm.median_iqr(s.get("failures") or [0])),
            }
        )
    return rows


def _fmt_stats(st: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return ">budget" if x is None else f"{x:g}"

    return f"{f(st['median'])} [{f(st['q25'])}–{f(st['q75'])}]"


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 of the data file (first 16 hex digits), recorded so a result names its exact input."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".gz", ".csv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name == "data":
        name = p.parent.name
    return name


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return v
