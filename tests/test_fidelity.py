"""Cheap fidelities: the multi-task GP learns from computed values, the choice pays for information, costs add up.

Real data throughout: the shipped CMR/OQMD table (``simulators/worlds/perovskites_cmr_oqmd.csv.gz``,
see its SOURCE.md), where OQMD's formation energy is a real, correlated cheap source of CMR's; a
permutation of the same column is the uninformative control.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sdl.config import CampaignConfigError, load_campaign

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "simulators" / "worlds" / "perovskites_cmr_oqmd.csv.gz"
CAMPAIGN = REPO / "campaigns" / "perovskite-multifidelity.yaml"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    df = pd.read_csv(TABLE).iloc[:300].copy()
    df["oqmd_shuffled"] = np.random.default_rng(0).permutation(df["oqmd_formation_energy"].to_numpy())
    return df


@pytest.fixture(scope="module")
def pool(table: pd.DataFrame):  # type: ignore[no-untyped-def]
    from sdl.engine.space import CandidatePool

    return CandidatePool.from_frame(table.drop(columns=["e_form"]), id_column="id", structure_column="cif",
                                    formula_column="formula", source="cmr_oqmd[:300]")


def _quick(bounds: torch.Tensor, n_tasks: int):  # type: ignore[no-untyped-def]
    """The model with fewer optimiser iterations: the behaviour under test, in seconds."""
    from sdl.engine.models.multifidelity import MultiFidelityGP

    return MultiFidelityGP(bounds, n_tasks, maxiter=30)


def _engine(pool, column: str, cost: float, design: int = 0):  # type: ignore[no-untyped-def]
    from sdl.engine.fidelity import ColumnSource
    from sdl.engine.multifidelity import MultiFidelityEngine

    return MultiFidelityEngine(
        objective={"goal": "minimize", "property": "e_form"}, model={"name": "gp"},
        acquisition={"function": "qlogei"}, seed=0, pool=pool, initial_design={"strategy": "random", "size": design},
        sources=[ColumnSource("cheap", cost, column)], compute_batch=8, model_factory=_quick,
    )


# -- the model ---------------------------------------------------------------------------------
def test_multifidelity_gp_learns_from_cheap_values(table: pd.DataFrame) -> None:
    """Held-out CMR error with 20 labels + 120 OQMD values is lower than with the 20 labels alone."""
    from sdl.engine.models.composition import composition_features
    from sdl.engine.models.gp import fit_gp, predict_gp
    from sdl.engine.models.multifidelity import MultiFidelityGP

    X = torch.as_tensor(composition_features(table["formula"].tolist()))
    y = torch.tensor(table["e_form"].to_numpy(), dtype=torch.float64)
    cheap = torch.tensor(table["oqmd_formation_energy"].to_numpy(), dtype=torch.float64)
    bounds = torch.stack([X.min(dim=0).values, X.max(dim=0).values])
    perm = torch.as_tensor(np.random.default_rng(3).permutation(len(table)))
    labelled, computed, held = perm[:20], perm[:120], perm[150:]

    mean_single, _ = predict_gp(fit_gp(X[labelled], y[labelled], bounds=bounds), X[held])
    mf = MultiFidelityGP(bounds, n_tasks=2, maxiter=50)
    mf.fit(torch.cat([X[labelled], X[computed]]), torch.cat([torch.zeros(20), torch.ones(120)]),
           torch.cat([y[labelled], cheap[computed]]))
    mean_multi, std_multi = mf.predict_target(X[held])
    mae_single = float((mean_single - y[held]).abs().mean())
    mae_multi = float((mean_multi - y[held]).abs().mean())
    assert mae_multi < 0.9 * mae_single, (mae_multi, mae_single)
    assert torch.isfinite(std_multi).all() and (std_multi > 0).all()
    assert float(mf.task_correlation()[0, 1]) > 0.5  # CMR and OQMD co-vary (Pearson 0.83 on the table)


def test_multifidelity_gp_rejects_too_few_measurements() -> None:
    from sdl.engine.models.multifidelity import MultiFidelityGP

    mf = MultiFidelityGP(torch.tensor([[0.0], [1.0]], dtype=torch.float64), n_tasks=2)
    with pytest.raises(ValueError, match="need 2 measured values"):
        mf.fit(torch.rand(5, 1, dtype=torch.float64), torch.tensor([0, 1, 1, 1, 1]), torch.rand(5))


# -- the cost-aware choice ---------------------------------------------------------------------
def test_cost_aware_choice_walks_ranked_candidates() -> None:
    """Information per cost decides each candidate; known sources are never paid again; quotas end the walk."""
    from sdl.engine.fidelity import cost_aware_choice

    info = np.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.01], [1.0, 0.5]])
    known = np.array([[False, False], [False, True], [False, False], [False, False]])
    picks = cost_aware_choice([7, 8, 9, 10], info, [1.0, 0.1], known, q=2, compute_batch=5)
    # 7: 0.5/0.1 beats 1/1 -> compute; 8: its source is known -> measure; 9: 0.01/0.1 < 1 -> measure (q reached)
    assert picks == [(7, 1), (8, 0), (9, 0)]
    assert cost_aware_choice([7, 8, 9], info[:3], [1.0, 0.1], np.zeros((3, 2), bool), q=5,
                             compute_batch=2) == [(7, 1), (8, 1)]


def _paired_engine(pool, table: pd.DataFrame, column: str, cost: float):  # type: ignore[no-untyped-def]
    from sdl.engine import Observation
    from sdl.engine.fidelity import Computation

    eng = _engine(pool, column, cost)
    rows = np.random.default_rng(1).permutation(len(table))[:40]
    eng.observe([Observation(str(table["id"].iloc[r]), value=float(table["e_form"].iloc[r])) for r in rows[:20]])
    eng.observe_computed([Computation(str(table["id"].iloc[r]), "cheap", float(table[column].iloc[r])) for r in rows])
    return eng


def test_informative_cheap_source_is_computed_first(pool, table: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    """OQMD at a fifth of an experiment's cost: the best-ranked candidates get computed, not made."""
    eng = _paired_engine(pool, table, "oqmd_formation_energy", 0.2)
    batch = eng.propose()
    assert batch and all(p.source == "cheap" and p.cost == 0.2 for p in batch)
    assert len(batch) == 8  # the compute quota of the round
    measured = eng.measured_keys
    assert not any(p.key in measured for p in batch)
    comps = eng.run_computations(batch)
    assert [c.value for c in comps] == [float(table.set_index("id").at[p.key, "oqmd_formation_energy"])
                                        for p in batch]
    before = eng.cost_spent
    eng.observe_computed(comps)
    assert math.isclose(eng.cost_spent, before + 8 * 0.2)
    assert eng.n_observed == 20  # computations are never experiments


def test_uninformative_source_is_not_paid_for(pool, table: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    """The same values permuted over the candidates carry no information: the engine measures instead."""
    batch = _paired_engine(pool, table, "oqmd_shuffled", 0.2).propose()
    assert [p.source for p in batch] == ["measured"]


# -- the design and the benchmark's cost accounting ---------------------------------------------
def test_design_computes_every_source_beside_each_design_experiment(pool) -> None:  # type: ignore[no-untyped-def]
    eng = _engine(pool, "oqmd_formation_energy", 0.05, design=3)
    batch = eng.propose(q=3)
    assert [p.source for p in batch] == ["measured"] * 3 + ["cheap"] * 3
    assert [p.key for p in batch[:3]] == [p.key for p in batch[3:]]


def test_benchmark_accounts_every_cost(tmp_path: Path) -> None:
    """Cumulative cost = experiments x measured cost + computations x their cost, at every measurement."""
    from sdl import benchmark as bmk
    from sdl import benchmark_metrics as bm
    from sdl.benchmark_fidelity import replay_multifidelity, replay_single_fidelity, with_fidelities

    small = tmp_path / "pairs.csv.gz"
    pd.read_csv(TABLE).iloc[:150].to_csv(small, index=False)
    cfg = with_fidelities(load_campaign(CAMPAIGN), compute_batch=6)
    cfg = cfg.model_copy(update={"initial_design": cfg.initial_design.model_copy(update={"size": 2})})
    ds = bmk.load_crystal_dataset(small, "e_form", "minimize", id_column="id", work_dir=tmp_path)
    top = bm.top_set(ds.truth, ds.goal, 0.05)
    multi = replay_multifidelity(ds, cfg, 0, 5, top, stop_at_half=False, model_factory=_quick)
    assert len(multi.keys) == len(set(multi.keys)) == 5
    cost = cfg.fidelities.sources[0].cost
    for j, (c, n) in enumerate(zip(multi.cost_after, multi.computations_after, strict=True)):
        assert math.isclose(c, (j + 1) * 1.0 + n * cost)
    assert multi.computations["oqmd"] == multi.computations_after[-1] > 2  # beyond the design's 2
    assert math.isclose(multi.total_cost, multi.cost_after[-1])
    single = replay_single_fidelity(ds, cfg, 0, 5, top, stop_at_half=False)
    assert single.cost_after == [float(j + 1) for j in range(5)] and single.computations == {}
    assert set(single.keys[:2]) == set(multi.keys[:2])  # the same seeded design


# -- configuration -----------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "campaigns" / "mf.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text.replace("../simulators", str(REPO / "simulators")))
    return path


def test_fidelity_without_a_cost_names_file_and_field(tmp_path: Path) -> None:
    text = CAMPAIGN.read_text().replace("      cost: 0.02", "      # no cost")
    path = _write(tmp_path, text)
    with pytest.raises(CampaignConfigError) as err:
        load_campaign(path)
    line = str(err.value)
    assert "\n" not in line and str(path) in line and "fidelities.sources[0].cost" in line and "required" in line


@pytest.mark.parametrize(("old", "new", "field", "says"), [
    ("      cost: 0.02", "      cost: 0", "fidelities.sources[0].cost", "greater than 0"),
    ("      column: oqmd_formation_energy", "      column: oqmd_e", "fidelities", "'oqmd_e' not in"),
    ("  measured_cost: 1.0", "", "fidelities.measured_cost", "required"),
    ("  function: qlogei", "  function: thompson", "fidelities", "thompson"),
])
def test_bad_fidelities_are_one_line(tmp_path: Path, old: str, new: str, field: str, says: str) -> None:
    text = CAMPAIGN.read_text()
    assert old in text
    with pytest.raises(CampaignConfigError) as err:
        load_campaign(_write(tmp_path, text.replace(old, new)))
    assert field in str(err.value) and says in str(err.value), str(err.value)


def test_campaign_without_fidelities_keeps_its_hash() -> None:
    """Old campaigns snapshot (and hash) exactly as before the option existed."""
    cfg = load_campaign(REPO / "campaigns" / "crossed-barrel.yaml")
    assert cfg.fidelities is None and "fidelities" not in cfg.snapshot()
    assert "fidelities" in load_campaign(CAMPAIGN).snapshot()


# -- the lab: computations run without an instrument and are kept, never experiments ------------
def test_lab_runs_computations_and_keeps_them_apart_from_experiments(tmp_path: Path, sqlite_url: str) -> None:
    from sdl.engine.multifidelity import MultiFidelityEngine
    from sdl.lab import open_lab, run_plain
    from sdl.lab.computations import restore_computed

    world = tmp_path / "pairs.csv.gz"
    frame = pd.read_csv(TABLE).iloc[:120]
    frame.to_csv(world, index=False)
    sim = "{time_scale: 0.002}"
    (tmp_path / "mf.yaml").write_text("\n".join([
        "name: mf-lab", "seed: 1",
        f"search_space: {{candidates: {{file: {world}, id_column: id, structure_column: cif, "
        "formula_column: formula}}",
        "objective: {property: e_form, unit: eV, goal: minimize}",
        "model: {name: gp}", "acquisition: {function: qlogei, batch_size: 1}",
        "initial_design: {strategy: random, size: 2}", "budget: {experiments: 4}",
        "fidelities: {measured_cost: 1.0, compute_batch: 4,"
        " sources: [{name: oqmd, kind: column, column: oqmd_formation_energy, cost: 0.05}]}",
        "instruments:",
        f"  - {{name: robot0, role: synthesis, simulated: true, world: {world}, simulator: {sim}}}",
        f"  - {{name: station0, role: characterization, simulated: true, world: {world}, measures: [e_form], "
        f"simulator: {sim}}}",
    ]) + "\n")
    cfg = load_campaign(tmp_path / "mf.yaml")
    truth = frame.set_index("id")
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        run_plain(lab)
        store, cid = lab.store, lab.campaign_id
        experiments = store.experiments(cid)
        assert [e.state for e in experiments] == ["completed"] * 4  # the budget counts experiments only
        kept = store.computed_values(cid)
        assert len(kept) > 2  # the design's two, then the rounds' (cost-aware) computations
        assert {s for _, s, _ in kept} == {"oqmd"}
        for key, _, value in kept:
            assert value == pytest.approx(float(truth.at[key, "oqmd_formation_energy"]))
        assert any(ev.kind == "fidelity.computed" for ev in store.events(cid))
        assert store.record_computed_values(cid, [(kept[0][0], "oqmd", 9.9, 0.05)], property="e_form") == 0
        fresh = MultiFidelityEngine.from_campaign(cfg)
        assert restore_computed(fresh, store, cid) == len(kept)  # a resumed campaign knows them all
        assert isinstance(fresh, MultiFidelityEngine) and fresh.n_computed == len(kept)


def test_plain_engine_refuses_a_campaign_with_fidelities() -> None:
    from sdl.engine import Engine
    from sdl.exceptions import EngineError

    with pytest.raises(EngineError, match="cannot run computed sources"):
        Engine.from_campaign(load_campaign(CAMPAIGN))


def test_pretrained_source_is_chgnets_zero_shot_energy(pool, table: pd.DataFrame, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CHGNet's prior as a cheap source: computed only for the rows asked, cached, and tracking CMR's e_form."""
    from sdl.engine.fidelity import PretrainedSource
    from sdl.engine.models.embedding_store import EmbeddingStore

    store = EmbeddingStore(tmp_path / "emb.sqlite")
    source = PretrainedSource("chgnet", 0.05, "chgnet", store=store)
    rows = list(range(30))
    prior = source.compute(pool, rows)
    assert prior.shape == (30,) and np.isfinite(prior).all()
    assert store.count() == 30  # only what was asked was featurised
    r = float(np.corrcoef(prior, table["e_form"].to_numpy()[rows])[0, 1])
    assert r > 0.5, r  # KNOWN_FACTS: Pearson 0.84 over the CMR pool
    assert np.array_equal(source.compute(pool, rows[:5]), prior[:5])  # read back from the store
