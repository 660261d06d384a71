"""Benchmark metrics on hand-checked cases, dataset loading, and real pool replays through the engine."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sdl import benchmark as bmk
from sdl import benchmark_metrics as bm

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ROOT / "simulators" / "worlds"


# ------------------------------------------------------------------------------------------ metrics


def test_top_count_and_top_set() -> None:
    assert bm.top_count(600, 0.05) == 30  # 0.05 * 600 is 30.000000000000004 in floats
    assert bm.top_count(18928, 0.01) == 190  # ceil(189.28)
    assert bm.top_count(94, 0.05) == 5  # ceil(4.7)
    assert bm.top_count(3, 0.01) == 1
    vals = [5.0, 1.0, 9.0, 7.0, 3.0]
    assert bm.top_set(vals, "max", 0.4).tolist() == [2, 3]
    assert bm.top_set(vals, "min", 0.4).tolist() == [1, 4]
    with pytest.raises(ValueError, match="goal"):
        bm.top_set(vals, "up", 0.4)
    with pytest.raises(ValueError, match="top_fraction"):
        bm.top_count(10, 0.0)


def test_recall_and_experiments_to() -> None:
    top = [2, 5, 7, 9]
    order = [0, 2, 1, 7, 3, 5, 4, 9]
    r = bm.recall_curve(order, top)
    assert r.tolist() == [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]
    assert bm.experiments_to(r, 0.5, 4) == 4
    assert bm.experiments_to(r, 1.0, 4) == 8
    assert bm.experiments_to(r, 0.25, 4) == 2
    assert bm.experiments_to(r[:5], 1.0, 4) is None
    # 50 % of an odd top set needs ceil(M/2): 3 of 5
    r5 = bm.recall_curve([0, 1, 2, 3], [0, 1, 2, 8, 9])
    assert bm.experiments_to(r5, 0.5, 5) == 3
    with pytest.raises(ValueError, match="repeats"):
        bm.recall_curve([1, 1], top)


def test_best_so_far() -> None:
    assert bm.best_so_far([1, 3, 2, 5], "max").tolist() == [1, 3, 3, 5]
    assert bm.best_so_far([4, 3, 5, 1], "min").tolist() == [4, 3, 3, 1]


def test_random_analytic_matches_simulation_and_liang() -> None:
    # Liang et al.'s crossed barrel: N = 600, M = 30 -> 15 found after k(N+1)/(M+1) = 290.8 draws
    assert bm.random_expected_experiments(15, 600, 30) == pytest.approx(290.806, abs=1e-3)
    assert bm.random_expected_experiments(30, 600, 30) == pytest.approx(581.613, abs=1e-3)
    # Monte Carlo check of both formulas on a small pool
    rng = np.random.default_rng(0)
    n, m, k = 40, 4, 2
    draws, found_at_10 = [], []
    for _ in range(20000):
        perm = rng.permutation(n)
        hits = np.cumsum(perm < m)
        draws.append(int(np.argmax(hits >= k)) + 1)
        found_at_10.append(hits[9])
    assert np.mean(draws) == pytest.approx(bm.random_expected_experiments(k, n, m), rel=0.02)
    assert np.mean(found_at_10) / m == pytest.approx(bm.random_expected_recall(10, n), rel=0.03)


def test_enhancement_and_acceleration() -> None:
    ef = bm.enhancement_factor([0.1, 0.2, 0.2, 0.5], pool_size=20)
    # EF(i) = recall(i) / (i / N)
    assert ef.tolist() == pytest.approx([2.0, 2.0, 20 * 0.2 / 3, 2.5])
    # AF at 50 % of M = 30 in N = 600 for a strategy needing 58 experiments: 290.8 / 58
    assert bm.acceleration_factor(58, 0.5, 600, 30) == pytest.approx(290.806 / 58, rel=1e-4)
    assert bm.acceleration_factor(None, 0.5, 600, 30) is None


def test_median_iqr_with_unreached_seeds() -> None:
    s = bm.median_iqr([10, 20, 30, 40])
    assert (s["median"], s["q25"], s["q75"], s["reached"]) == (25.0, 17.5, 32.5, 4)
    # one seed out of 4 never reached: it counts as +inf, the upper quartile becomes unknown
    s = bm.median_iqr([10, 20, 30, None])
    assert s["median"] == 25.0 and s["q25"] == 17.5 and s["q75"] is None and s["reached"] == 3
    s = bm.median_iqr([None, None, 5])
    assert s["median"] is None and s["reached"] == 1


def test_summarize_strategy_shapes_and_af() -> None:
    top = [0, 1]
    orders = [[0, 5, 1, 3], [4, 0, 1, 2], [1, 2, 3, 0]]
    recalls = [bm.recall_curve(o, top) for o in orders]
    vals = np.arange(10.0)[::-1]
    best = [bm.best_so_far(vals[o], "max") for o in orders]
    s = bm.summarize_strategy(recalls, best, pool_size=10, n_top=2)
    assert s["recall_median"] == [0.5, 0.5, 1.0, 1.0]
    assert s["levels"]["0.5"]["experiments"] == [1, 2, 1]
    assert s["levels"]["1"]["experiments"] == [3, 3, 4]
    assert s["levels"]["1"]["experiments_stats"]["median"] == 3.0
    assert s["levels"]["1"]["af_median"] == pytest.approx(2 * 11 / 3 / 3)
    assert len(s["best_so_far_median"]) == 4


# ------------------------------------------------------------------------------------------ datasets


def _tiny_table(tmp_path: Path) -> Path:
    """A dataset 'never seen' by the project: new column names, replicates, a BOM."""
    rng = np.random.default_rng(7)
    rows = []
    for a in range(6):
        for b in range(5):
            y = -((a - 3.2) ** 2) - (b - 1.1) ** 2
            rows.extend(
                {"Temp (C)": 20 + 10 * a, "ratio": 0.5 * b, "Yield %": y + rng.normal(scale=0.05)}
                for _ in range(1 + (a + b) % 2)
            )
    path = tmp_path / "my_lab.csv"
    pd.DataFrame(rows).to_csv(path, index=False, encoding="utf-8-sig")
    return path


def test_table_dataset_groups_replicates(tmp_path: Path) -> None:
    path = _tiny_table(tmp_path)
    ds = bmk.load_table_dataset(path, "Yield %", "max", ["Temp (C)", "ratio"], work_dir=tmp_path / "w")
    assert ds.pool_size == 30 and ds.n_rows == 45
    pool = pd.read_csv(ds.pool_csv)
    assert "Yield %" not in pool.columns and len(pool) == 30
    df = pd.read_csv(path, encoding="utf-8-sig")
    means = df.groupby(["Temp (C)", "ratio"])["Yield %"].mean().to_numpy()
    assert np.allclose(ds.truth, means)
    # a measurement is one of the real replicates, the same for the same (seed, design)
    i = next(j for j, r in enumerate(ds.replicates) if r.size == 2)
    assert ds.measure(i, 3) in set(ds.replicates[i].tolist())
    assert ds.measure(i, 3) == ds.measure(i, 3)
    assert {ds.measure(i, s) for s in range(20)} == set(ds.replicates[i].tolist())


def test_dataset_errors_name_the_column(tmp_path: Path) -> None:
    path = _tiny_table(tmp_path)
    with pytest.raises(bmk.BenchmarkError, match=r"my_lab.csv: parameter column\(s\) 'temp'"):
        bmk.load_table_dataset(path, "Yield %", "max", ["temp", "ratio"])
    with pytest.raises(bmk.BenchmarkError, match=r"target column\(s\) 'yield'"):
        bmk.load_table_dataset(path, "yield", "max", ["ratio"])
    with pytest.raises(bmk.BenchmarkError, match="goal"):
        bmk.load_table_dataset(path, "Yield %", "up", ["ratio"])
    with pytest.raises(bmk.BenchmarkError, match=r"structure column\(s\) 'cif'"):
        bmk.load_crystal_dataset(path, "Yield %", "max", "cif")
    with pytest.raises(bmk.BenchmarkError, match="not found"):
        bmk.load_table_dataset(tmp_path / "nope.csv", "y", "max", ["a"])


def test_headerless_csv_with_columns(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2,0.5\n1,3,0.7\n2,2,0.1\n")
    ds = bmk.load_table_dataset(path, "y", "min", ["a", "b"], columns=["a", "b", "y"], work_dir=tmp_path)
    assert ds.pool_size == 3 and ds.name == tmp_path.name


def test_parse_strategies() -> None:
    s = bmk.parse_strategies("random, gp, gp:qucb, gnn-ensemble")
    assert [(x.label, x.model, x.acquisition) for x in s] == [
        ("random", "random", "qlognei"),
        ("gp", "gp", "qlognei"),
        ("gp:qucb", "gp", "qucb"),
        ("gnn-ensemble", "gnn-ensemble", "qucb"),
    ]
    assert bmk.parse_strategies("gp", "qucb")[0].acquisition == "qucb"
    with pytest.raises(bmk.BenchmarkError, match="unknown strategy 'svm'"):
        bmk.parse_strategies("random,svm")
    with pytest.raises(bmk.BenchmarkError, match="gp:foo"):
        bmk.parse_strategies("gp:foo")


def test_crystal_dataset_from_shipped_slice(tmp_path: Path) -> None:
    ds = bmk.load_crystal_dataset(WORLDS / "perovskites_demo.csv.gz", "e_form", "min", "cif", work_dir=tmp_path)
    assert ds.pool_size == 400 and ds.mode == "crystal" and ds.formula_column == "formula"
    assert ds.measure(5, 0) == ds.truth[5]


# ------------------------------------------------------------------------------------------ replays (real engine)

engine = pytest.importorskip("sdl.engine", reason="sdl.engine (issue 4) not importable")


def _barrel_slice(tmp_path: Path) -> Path:
    """A slice of the real crossed-barrel table under new column names (a dataset 'never seen')."""
    df = pd.read_csv(WORLDS / "crossed_barrel.csv")
    df = df[df["n"].isin([6, 12]) & df["theta"].isin([0, 100, 200]) & df["r"].isin([1.5, 2.0, 2.5])]
    df = df.rename(
        columns={"n": "struts", "theta": "twist_deg", "r": "radius_mm", "t": "wall_mm", "toughness": "Toughness (J)"}
    )
    path = tmp_path / "barrel_slice.csv"
    df.to_csv(path, index=False)
    return path


def _perovskite_slice(tmp_path: Path) -> Path:
    with gzip.open(WORLDS / "perovskites_demo.csv.gz", "rt") as fh:
        df = pd.read_csv(fh).head(48)
    df = df.rename(columns={"id": "material_id", "cif": "structure_cif", "e_form": "dHf_eV"}).drop(columns=["formula"])
    path = tmp_path / "my_crystals.csv.gz"
    df.to_csv(path, index=False)
    return path


BARREL_PARAMS = ["struts", "twist_deg", "radius_mm", "wall_mm"]


def test_replay_pool_membership_same_initial_designs_and_schema(tmp_path: Path) -> None:
    ds = bmk.load_table_dataset(_barrel_slice(tmp_path), "Toughness (J)", "max", BARREL_PARAMS, work_dir=tmp_path / "w")
    assert 20 <= ds.pool_size <= 60
    strategies = bmk.parse_strategies("random,gp:qucb")
    res = bmk.run_benchmark(ds, strategies, seeds=[0, 1], budget=7, top_fraction=0.1, initial=2)
    pool_keys = set(ds.ids)
    for s in res["strategies"].values():
        assert len(s["recall"]) == 2 and all(len(r) == 7 for r in s["recall"])
        for keys in s["keys"]:
            assert set(keys) <= pool_keys and len(set(keys)) == 7
        assert len(s["experiments_to_half"]) == len(s["experiments_to_all"]) == 2
        for curve, keys, measured in zip(s["best_so_far"], s["keys"], s["measured"], strict=True):
            truth = [float(ds.truth[ds.ids.index(k)]) for k in keys]
            assert curve == pytest.approx(np.maximum.accumulate(truth).tolist())
            for k, v in zip(keys, measured, strict=True):  # each measurement is a real replicate of that design
                assert v in ds.replicates[ds.ids.index(k)].tolist()
    # same initial designs per seed for every strategy, and different seeds start differently
    for seed_idx in range(2):
        firsts = {frozenset(s["keys"][seed_idx][:2]) for s in res["strategies"].values()}
        assert len(firsts) == 1
    assert res["initial_designs_identical"] is True
    for key in ("dataset", "target", "goal", "pool_size", "top_fraction", "budget", "seeds"):
        assert key in res
    assert res["n_top"] == bm.top_count(ds.pool_size, 0.1)
    paths = bmk.write_outputs(res, tmp_path / "out")
    loaded = json.loads(paths["results"].read_text())
    assert loaded["strategies"]["gp:qucb"]["recall"] == res["strategies"]["gp:qucb"]["recall"]
    assert paths["recall"].stat().st_size > 1000 and paths["best_so_far"].exists()


def test_replay_is_reproducible(tmp_path: Path) -> None:
    ds = bmk.load_table_dataset(_barrel_slice(tmp_path), "Toughness (J)", "max", BARREL_PARAMS, work_dir=tmp_path)
    s = bmk.parse_strategies("gp")[0]
    a = bmk.replay(ds, s, seed=3, budget=5)
    b = bmk.replay(ds, s, seed=3, budget=5)
    assert a.keys == b.keys and a.measured == b.measured


class _ForeignKeyEngine:
    """A real engine whose third proposal is replaced by a key outside the pool (to test the guard)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls = 0

    def propose(self, q: int, pending: tuple[str, ...] = ()) -> list:
        props = self.inner.propose(q=q)  # type: ignore[attr-defined]
        self.calls += 1
        if self.calls == 3:
            import dataclasses

            props = [dataclasses.replace(props[0], key="not-a-row")]
        return props

    def observe(self, obs: list) -> None:
        self.inner.observe(obs)  # type: ignore[attr-defined]


def test_replay_rejects_a_proposal_outside_the_pool(tmp_path: Path) -> None:
    ds = bmk.load_table_dataset(_barrel_slice(tmp_path), "Toughness (J)", "max", BARREL_PARAMS, work_dir=tmp_path)

    def factory(*args: object) -> _ForeignKeyEngine:
        return _ForeignKeyEngine(bmk.default_engine_factory(*args))  # type: ignore[arg-type]

    with pytest.raises(bmk.BenchmarkError, match="'not-a-row' is not a row of the pool"):
        bmk.replay(ds, bmk.parse_strategies("random")[0], seed=0, budget=5, engine_factory=factory)


# ------------------------------------------------------------------------------------------ CLI


def _invoke(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from sdl.cli.main import app

    result = CliRunner().invoke(app, args)
    text = result.output + (getattr(result, "stderr", "") if result.exit_code else "")
    return result.exit_code, text


def test_cli_table_dataset_never_seen(tmp_path: Path) -> None:
    data = _barrel_slice(tmp_path)
    out = tmp_path / "res"
    code, text = _invoke(
        ["benchmark", "--data", str(data), "--target", "Toughness (J)", "--goal", "max",
         "--params", ",".join(BARREL_PARAMS), "--strategies", "random,gp", "--seeds", "2", "--budget", "6",
         "--top-fraction", "0.1", "--out", str(out)]
    )
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert res["target"] == "Toughness (J)" and res["seeds"] == [0, 1] and res["budget"] == 6
    assert set(res["strategies"]) == {"random", "gp"}
    assert (out / "recall.png").exists() and (out / "best_so_far.png").exists()
    assert "random (analytic)" in text


def test_cli_crystal_dataset_never_seen(tmp_path: Path) -> None:
    data = _perovskite_slice(tmp_path)
    out = tmp_path / "res"
    code, text = _invoke(
        ["benchmark", "--data", str(data), "--target", "dHf_eV", "--goal", "min", "--structure-column",
         "structure_cif", "--id-column", "material_id", "--strategies", "random,gp", "--seeds", "2",
         "--budget", "5", "--out", str(out)]
    )
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "crystal" and res["pool_size"] == 48 and res["n_top"] == 3
    ids = set(pd.read_csv(data)["material_id"].astype(str))
    for s in res["strategies"].values():
        assert all(set(k) <= ids for k in s["keys"])


def test_cli_errors_name_the_column(tmp_path: Path) -> None:
    data = _barrel_slice(tmp_path)
    code, text = _invoke(
        ["benchmark", "--data", str(data), "--target", "toughness", "--goal", "max", "--params", "struts",
         "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "'toughness' not found" in text and "Traceback" not in text
    code, text = _invoke(
        ["benchmark", "--data", str(data), "--target", "Toughness (J)", "--goal", "max", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "--params" in text
    code, text = _invoke(
        ["benchmark", "--data", str(data), "--target", "Toughness (J)", "--goal", "max", "--params", "struts",
         "--strategies", "random,svm", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "svm" in text


def test_cli_campaign_yaml(tmp_path: Path) -> None:
    data = _barrel_slice(tmp_path)
    df = pd.read_csv(data)
    df.insert(0, "id", [f"row{i}" for i in range(len(df))])
    df.to_csv(data, index=False)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(
        "name: barrel-bench\n"
        "search_space:\n  candidates:\n    file: barrel_slice.csv\n"
        f"    parameter_columns: [{', '.join(BARREL_PARAMS)}]\n"
        "objective:\n  property: Toughness (J)\n  unit: J\n  goal: maximize\n"
        "model:\n  name: gp\n"
        "acquisition:\n  function: qucb\n"
        "budget:\n  experiments: 6\n"
    )
    out = tmp_path / "res"
    code, text = _invoke(["benchmark", str(yaml_path), "--seeds", "1", "--out", str(out)])
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert res["budget"] == 6 and set(res["strategies"]) == {"random", "gp"}
    assert res["strategies"]["gp"]["acquisition"] == "qucb"
