"""The several-objective engine for real: BoTorch qLogNEHVI over per-property surrogates on real perovskites.

Real models throughout: GPs on composition descriptors (the table/crystal GP), and heads (a GP, or an
MLP ensemble) on a real backbone's embedding plugged in by import path (element fractions,
``test_pretrained:CompositionBackbone``), so the ensemble path of the ModelList is exercised without
loading CHGNet.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pandas as pd
import pytest

from sdl.engine import Engine, Observation
from sdl.engine.models.embedding_store import EmbeddingStore
from sdl.engine.models.multi_output import MultiOutputSurrogate
from sdl.engine.multi_objective import MultiObjectiveEngine, ParetoSelection
from sdl.engine.objectives import Objective
from sdl.engine.pareto import Constraint, MultiObjective
from sdl.engine.space import CandidatePool, ParameterSpace

WORLD = Path(__file__).resolve().parent.parent / "simulators" / "worlds" / "perovskites_demo.csv.gz"
BACKBONE = "test_pretrained:CompositionBackbone"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(WORLD).iloc[:120].reset_index(drop=True)


@pytest.fixture(scope="module")
def pool(frame: pd.DataFrame) -> CandidatePool:
    return CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula", source="demo120")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingStore:
    return EmbeddingStore(tmp_path_factory.mktemp("emb") / "embeddings.sqlite")


def objectives(constraint: bool = True) -> MultiObjective:
    return MultiObjective([Objective("minimize", property="e_form"),
                           Objective("target", (1.5, 3.0), property="gap_gllbsc")],
                          [Constraint("gap_gllbsc", ">=", 0.5)] if constraint else [], reference_point=[1.0, 1.5])


def engine(pool: CandidatePool, store: EmbeddingStore, model: NS, mo: MultiObjective | None = None,
           seed: int = 0) -> MultiObjectiveEngine:
    return MultiObjectiveEngine(mo or objectives(), model, NS(function="qlognei", batch_size=3, beta=2.0),
                                extensive={"e_form": True}, seed=seed, pool=pool,
                                initial_design=NS(strategy="random", size=6), embedding_store=store)


def observe(eng: Engine, frame: pd.DataFrame, keys: list[str]) -> None:
    rows = frame.set_index("id").loc[keys]
    eng.observe([Observation(k, {}, float(r.e_form), {"gap_gllbsc": float(r.gap_gllbsc)}) for k, r in rows.iterrows()])


def run(eng: MultiObjectiveEngine, frame: pd.DataFrame, rounds: int) -> list[list[str]]:
    batches = []
    for _ in range(rounds):
        batch = eng.propose()
        batches.append([p.key for p in batch])
        observe(eng, frame, batches[-1])
    return batches


@pytest.mark.parametrize("head", ["gp", "mlp"])
def test_qlognehvi_over_the_crystal_heads_proposes_new_distinct_candidates(
    frame: pd.DataFrame, pool: CandidatePool, store: EmbeddingStore, head: str
) -> None:
    model = NS(name="gnn-ensemble", options={"backbone": BACKBONE, "use_prior": False, "head": head, "members": 4})
    eng = engine(pool, store, model)
    batches = run(eng, frame, 3)  # 2 design batches, then a model batch
    keys = [k for b in batches for k in b]
    assert len(keys) == len(set(keys)) == 9
    assert isinstance(eng.surrogate, MultiOutputSurrogate) and isinstance(eng.selection, ParetoSelection)
    assert eng.acquisition_name == "qlognehvi" and eng.surrogate.properties == ["e_form", "gap_gllbsc"]
    last = eng.propose()
    assert {p.strategy for p in last} == {"gnn-ensemble"} and len({p.key for p in last}) == 3
    assert not {p.key for p in last} & set(keys)
    assert all(p.acquisition_value is not None and np.isfinite(p.acquisition_value) for p in last)
    assert eng.model_version.startswith("gnn-ensemble-")
    # the same state gives the same proposals; pending ones are never proposed again
    assert [p.key for p in eng.propose()] == [p.key for p in last]
    again = eng.propose(pending=[last[0].key])
    assert last[0].key not in {p.key for p in again}


def test_qlognehvi_over_composition_gps_and_the_measured_front(frame: pd.DataFrame, pool: CandidatePool,
                                                               store: EmbeddingStore) -> None:
    eng = engine(pool, store, NS(name="gp", options={}))
    run(eng, frame, 3)
    assert eng.n_observed == 9 and eng.measured().shape == (9, 2)
    Y = eng.measured()
    front = {o.key for o in eng.pareto_front()}
    assert front == {eng.observations[i].key for i in np.flatnonzero(eng.objectives.front(Y))}
    assert eng.hypervolume() == pytest.approx(eng.objectives.hypervolume(Y, np.array([-1.0, -1.5])))
    # a second property with fewer labels is fine: the list fits each on its own measurements
    eng.observe([Observation(pool.keys[int(i)], {}, float(frame.e_form[int(i)])) for i in range(110, 112)])
    eng.propose()
    assert eng.surrogate.parts["gap_gllbsc"].n_train == 9 and eng.surrogate.parts["e_form"].n_train == 11


def test_one_objective_with_a_constraint_is_constrained_qlognei(frame: pd.DataFrame, pool: CandidatePool,
                                                                store: EmbeddingStore) -> None:
    mo = MultiObjective([Objective("minimize", property="e_form")], [Constraint("gap_gllbsc", ">=", 0.5)])
    eng = engine(pool, store, NS(name="gp", options={}), mo)
    assert eng.properties == ["e_form", "gap_gllbsc"]
    run(eng, frame, 2)
    batch = eng.propose()
    assert eng.selection.name == "qlognei" and len(batch) == 3 and batch[0].strategy == "gp"


def test_random_stays_random_and_campaigns_with_objectives_get_this_engine(pool: CandidatePool,
                                                                           store: EmbeddingStore) -> None:
    eng = engine(pool, store, NS(name="random", options={}))
    plain = Engine(NS(goal="minimize", property="e_form"), NS(name="random", options={}),
                   NS(function="qlognei", batch_size=3), seed=0, pool=pool,
                   initial_design=NS(strategy="random", size=6))
    assert [p.key for p in eng.propose()] == [p.key for p in plain.propose()]
    from sdl.config import load_campaign

    cfg = load_campaign(Path(__file__).resolve().parent.parent / "campaigns" / "perovskite-pareto.yaml")
    built = Engine.from_campaign(cfg, embedding_store=store)
    assert isinstance(built, MultiObjectiveEngine) and built.properties == ["e_form", "gap_gllbsc"]
    assert built.extensive and not built.surrogate.parts["gap_gllbsc"].extensive  # e_form per cell, gap not


def test_space_mode_optimises_qlognehvi_in_the_box_over_real_crossed_barrel_recipes() -> None:
    """Toughness up, strut thickness (the printed material, a cost) down: a ModelList of GPs and optimize_acqf."""
    from sdl.config import load_campaign

    repo = Path(__file__).resolve().parent.parent
    cfg = load_campaign(repo / "campaigns" / "crossed-barrel.yaml")
    space = ParameterSpace.from_config(cfg.search_space.parameters)
    rows = pd.read_csv(repo / "simulators" / "worlds" / "crossed_barrel.csv").sample(10, random_state=0)
    mo = MultiObjective([Objective("maximize", property="toughness"), Objective("minimize", property="t")])
    eng = MultiObjectiveEngine(mo, NS(name="gp", options={}), NS(function="qlognei", batch_size=2), seed=0,
                               space=space, initial_design=NS(strategy="sobol", size=2))
    eng.observe([Observation("", {"n": int(r.n), "theta": float(r.theta), "r": float(r.r), "t": float(r.t)},
                             float(r.toughness), {"t": float(r.t)}) for r in rows.itertuples()])
    batch = eng.propose()
    assert len(batch) == 2 and {p.strategy for p in batch} == {"gp"}
    assert len({p.key for p in batch}) == 2 and not {p.key for p in batch} & eng.measured_keys
    for p in batch:  # valid recipes inside the box
        assert 6 <= p.params["n"] <= 12 and space.key_of(p.params) == p.key
