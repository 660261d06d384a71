"""Warm start (``transfer:``): a second campaign seeded by a first one's measurements in the repository.

Real data (the crossed-barrel table, ``simulators/worlds/crossed_barrel.csv``), a real SQLite (and
PostgreSQL) repository, real BoTorch multi-task GP fits. The first campaign's measurements are real
replicates of designs of pool A; the second campaign searches pool B, which shares designs with A.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from sdl.config import load_campaign
from sdl.engine import Engine, Observation
from sdl.exceptions import CampaignConfigError
from sdl.lab.instruments import InstrumentPool
from sdl.lab.laboratory import Lab
from sdl.lab.transfer import load_related, source_measurements
from sdl.repository import Store

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "simulators" / "worlds" / "crossed_barrel.csv"
PARAMS = ["n", "theta", "r", "t"]


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Pool A and pool B (seeded halves of the 600 designs sharing 150) and the designs' mean toughness."""
    df = pd.read_csv(WORLD)
    designs = df.groupby(PARAMS, sort=True)["toughness"].agg(["mean", "first"]).reset_index()
    order = np.random.default_rng(7).permutation(len(designs))
    a, b = designs.iloc[order[:375]].reset_index(drop=True), designs.iloc[order[225:]].reset_index(drop=True)
    out = tmp_path_factory.mktemp("pools")
    b_csv = out / "pool_b.csv"
    b.assign(id=[f"b{i:03d}" for i in range(len(b))])[["id", *PARAMS]].to_csv(b_csv, index=False)
    return {"a": a, "b": b, "b_csv": b_csv, "dir": out}


def _first_campaign(store: Store, a: pd.DataFrame, *, name: str = "first", unit: str = "J",
                    prop: str = "toughness", n: int = 80) -> None:
    """A finished first campaign: ``n`` designs of pool A measured (their first real replicate)."""
    c = store.get_or_create_campaign(name, snapshot={"objective": {"property": prop, "unit": unit,
                                                                   "goal": "maximize"}},
                                     config_hash=name, seed=0, budget=n)
    rows = a.iloc[np.random.default_rng(3).permutation(len(a))[:n]]
    for i, row in enumerate(rows.itertuples(index=False)):
        params = {"n": int(row.n), "theta": float(row.theta), "r": float(row.r), "t": float(row.t)}
        eid = store.propose_experiment(c.id, idempotency_key=f"{name}:{i}", candidate_key=f"a{i:03d}", params=params)
        store.start_experiment(eid, instruments=["printer"])
        store.add_measurement(eid, property=prop, value=float(row.first), unit=unit)
        store.complete_experiment(eid)


def _campaign_yaml(pools: dict[str, object], transfer: object | None, *, name: str = "second",
                   design: int = 4, budget: int = 30) -> Path:
    data: dict[str, object] = {
        "name": name,
        "search_space": {"candidates": {"file": str(pools["b_csv"]), "id_column": "id",
                                        "parameter_columns": PARAMS}},
        "objective": {"property": "toughness", "unit": "J", "goal": "maximize"},
        "model": {"name": "gp"},
        "acquisition": {"function": "qlognei", "batch_size": 4},
        "initial_design": {"strategy": "random", "size": design},
        "budget": {"experiments": budget},
        "instruments": [
            {"name": "printer", "role": "synthesis", "simulated": True, "world": str(WORLD)},
            {"name": "tester", "role": "characterization", "simulated": True, "world": str(WORLD),
             "measures": ["toughness"]},
        ],
    }
    if transfer is not None:
        data["transfer"] = transfer
    path = Path(str(pools["dir"])) / f"{name}-{abs(hash(str(transfer))) % 10_000}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _lab(cfg_path: Path, store: Store) -> Lab:
    cfg = load_campaign(cfg_path)
    return Lab(cfg, store, Engine.from_campaign(cfg), InstrumentPool({}), state_dir=cfg_path.parent / "runs")


def test_second_campaign_predicts_the_top_better_warm_and_spends_no_budget(pools: dict[str, object],
                                                                          tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path / 'sdl.db'}", create=True)
    _first_campaign(store, pools["a"])  # type: ignore[arg-type]
    b: pd.DataFrame = pools["b"]  # type: ignore[assignment]
    truth = b["mean"].to_numpy()
    top = np.argsort(-truth)[:19]  # pool B's top 5 %
    errors = {}
    for arm, transfer in (("cold", None), ("warm", {"campaigns": ["first"]})):
        lab = _lab(_campaign_yaml(pools, transfer, name=f"second-{arm}"), store)
        lab.load()
        engine = lab.engine
        # The source is no experiment of this campaign: nothing observed, nothing counted, design intact.
        assert engine.n_observed == 0 and engine.best_value() is None
        assert lab.ledger.counts()["completed"] == 0
        assert (engine.related is not None) == (arm == "warm")
        design = engine.propose(q=4)
        assert len(design) == 4 and all(p.strategy == "initial-design" for p in design)
        engine.observe([Observation(p.key, p.params, float(truth[int(p.key[1:])])) for p in design])
        engine.fit()
        mean, _ = engine.predict_pool()
        errors[arm] = float(np.abs(mean.numpy()[top] - truth[top]).mean())
        picks = engine.propose(q=4)
        assert all(p.strategy == "gp" for p in picks) and engine.n_observed == 4
        if arm == "warm":
            assert engine.model_version.startswith("gp-1-")
            metrics = engine.uncertainty_metrics()  # leave-one-out of this campaign's 4 labels only
            assert metrics["n_train"] == 4 and np.isfinite(metrics["mae"])
    summary = {s["name"]: s for s in store.campaign_summaries()}
    assert summary["second-warm"]["counts"]["completed"] == 0 and summary["second-warm"]["best_value"] is None
    assert summary["second-warm"]["budget"] == 30
    # Cold, four labels cannot know the top; warm, the first campaign's 80 designs tell it.
    assert errors["warm"] < 0.75 * errors["cold"], errors
    store.close()


def test_source_rows_stay_proposable_unless_skip_measured(pools: dict[str, object], tmp_path: Path) -> None:
    store = Store.from_url(f"sqlite:///{tmp_path / 'sdl.db'}", create=True)
    _first_campaign(store, pools["a"])  # type: ignore[arg-type]
    b: pd.DataFrame = pools["b"]  # type: ignore[assignment]
    n = len(b)
    proposed = {}
    for skip in (False, True):
        path = _campaign_yaml(pools, {"campaigns": ["first"], "skip_measured": skip}, name=f"s{int(skip)}",
                              design=n, budget=n)
        lab = _lab(path, store)
        lab.load()
        proposed[skip] = {p.key for p in lab.engine.propose(q=n)}  # the whole design: every row still free
    shared = {f"b{i:03d}" for i, row in enumerate(b.itertuples(index=False))
              if any((row.n, row.theta, row.r, row.t) == (r["n"], r["theta"], r["r"], r["t"])
                     for r in (s.params for s in source_measurements(lab.cfg, store)))}
    assert shared and len(proposed[False]) == n
    assert proposed[True] == proposed[False] - shared
    store.close()


def test_sources_checked_against_the_repository(pools: dict[str, object], database_url: str) -> None:
    store = Store.from_url(database_url, create=True)
    a: pd.DataFrame = pools["a"]  # type: ignore[assignment]
    _first_campaign(store, a, n=12)
    _first_campaign(store, a, name="in-kj", unit="kJ", n=3)
    _first_campaign(store, a, name="hardness", prop="hardness", unit="HV", n=3)

    def error(transfer: object) -> str:
        cfg = load_campaign(_campaign_yaml(pools, transfer))
        with pytest.raises(CampaignConfigError) as exc:
            source_measurements(cfg, store)
        return str(exc.value)

    line = error({"campaigns": ["first", "nope"]})
    assert "transfer.campaigns: campaign 'nope' does not exist in the repository" in line and ".yaml:" in line
    assert "\n" not in line
    assert "campaign 'hardness' measured no 'toughness' (it measured: hardness)" in error({"campaigns": ["hardness"]})
    assert "campaign 'in-kj' measured 'toughness' in 'kJ', this campaign in 'J'" in error({"campaigns": ["in-kj"]})
    # "all": every other campaign that measured toughness in J (the kJ one is skipped, not an error).
    related = load_related(load_campaign(_campaign_yaml(pools, {"campaigns": "all"})), store)
    assert related is not None and related.task_names == ("first",) and len(related) == 12
    store.close()


def test_bad_transfer_yaml_is_one_line(pools: dict[str, object]) -> None:
    for transfer, expected in (
        ({"campaigns": ["second"]}, "transfer: campaigns names this campaign itself ('second')"),
        ({"campaigns": []}, "transfer.campaigns:"),
        ({"campaigns": ["first"], "mode": "prior"}, "transfer.mode:"),
    ):
        with pytest.raises(CampaignConfigError) as exc:
            load_campaign(_campaign_yaml(pools, transfer))
        assert expected in str(exc.value) and ".yaml:" in str(exc.value), str(exc.value)


def test_sdl_run_refuses_a_missing_source_before_anything_runs(pools: dict[str, object], tmp_path: Path) -> None:
    from sdl.cli.main import app

    db = tmp_path / "run.db"
    store = Store.from_url(f"sqlite:///{db}", create=True)
    _first_campaign(store, pools["a"], n=3)  # type: ignore[arg-type]
    store.close()
    path = _campaign_yaml(pools, {"campaigns": ["frist"]})
    result = CliRunner().invoke(app, ["run", str(path), "--db", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"{path}:" in text and "transfer.campaigns: campaign 'frist' does not exist in the repository " \
        "(campaigns there: first)" in text
    store = Store.from_url(f"sqlite:///{db}")
    assert [c.name for c in store.campaigns()] == ["first"]  # nothing of the second campaign was written
    store.close()


def test_crystal_pool_head_gp_learns_from_the_source_campaign(tmp_path: Path) -> None:
    """A pretrained-backbone engine (GP head) on perovskites: source crystals of the same pool seed it."""
    from types import SimpleNamespace as NS

    from sdl.engine.models.embedding_store import EmbeddingStore
    from sdl.engine.models.multitask import RelatedData
    from sdl.engine.space import CandidatePool

    frame = pd.read_csv(ROOT / "simulators" / "worlds" / "perovskites_2k.csv.gz").iloc[:200].reset_index(drop=True)
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula", source="p200")
    y = frame["e_form"].to_numpy()
    rng = np.random.default_rng(0)
    source = rng.permutation(len(pool))[:80]
    related = RelatedData.from_rows([("first", pool.keys[i], {"formula": frame.at[i, "formula"]}, float(y[i]))
                                     for i in source])
    best = set(np.argsort(y)[:20].tolist())
    found = {}
    store = EmbeddingStore(tmp_path / "emb.sqlite")
    for arm in ("cold", "warm"):
        eng = Engine(objective=NS(goal="minimize"),
                     model=NS(name="gnn-ensemble", options={"backbone": "test_pretrained:CompositionBackbone",
                                                            "use_prior": False, "head": "gp"}),
                     acquisition=NS(function="qucb", batch_size=4), seed=1, pool=pool,
                     initial_design=NS(strategy="random", size=4), embedding_store=store)
        if arm == "warm":
            eng.add_related(related)
        design = eng.propose()
        eng.observe([Observation(p.key, {}, float(y[pool.index_of(p.key)])) for p in design])
        eng.fit()
        assert eng.n_observed == 4 and eng.head_kind == "gp"
        mean, _ = eng.predict_pool()
        found[arm] = len(best & set(np.argsort(mean.numpy())[:20].tolist()))  # true top 20 in its top 20
    assert found["warm"] >= found["cold"] + 2, found


def test_source_measurements_match_by_recipe_not_by_a_colliding_id(pools: dict[str, object]) -> None:
    """Ids are per file: the first campaign's ``b001`` is not this pool's ``b001`` unless the recipe agrees."""
    from sdl.engine.models.multitask import related_row
    from sdl.engine.space import CandidatePool

    pool = CandidatePool.from_csv(pools["b_csv"], id_column="id", parameter_columns=PARAMS)  # type: ignore[arg-type]
    other = pool.params(7)
    assert related_row(pool, "b001", other) == 7
    assert related_row(pool, "b001", {**other, "theta": 1e6}) is None  # no such design here (encoded instead)
    crystals = CandidatePool.from_csv(ROOT / "tests" / "data" / "mp_perovskites_12.csv", id_column="id",
                                      structure_column="cif", formula_column="formula")
    key, formula = crystals.keys[3], crystals.formulas([3])[0]
    assert related_row(crystals, key, {"formula": formula}) == 3 and related_row(crystals, key, {}) == 3
    assert related_row(crystals, key, {"formula": "NaCl"}) is None
