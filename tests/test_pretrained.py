"""The pretrained crystal engine for real: CHGNet's wheel weights on real CMR perovskites.

No stand-in for the model: every test featurises real crystals with the real CHGNet 0.3.0
checkpoint (~90 crystals/s on one thread) through the on-disk embedding cache.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure

from sdl.engine import Engine, Observation
from sdl.engine.models.backbones import BackboneError, Featurization, load_backbone
from sdl.engine.models.backbones.chgnet import CHGNetBackbone
from sdl.engine.models.embedding_store import EmbeddingStore, featurize_texts
from sdl.engine.models.pretrained import HeadEnsemble, HeadOptions, oob_calibration, standardized_inputs
from sdl.engine.space import CandidatePool
from sdl.engine.uq import uncertainty_metrics
from sdl.exceptions import EngineError

WORLD = Path(__file__).resolve().parent.parent / "simulators" / "worlds" / "perovskites_2k.csv.gz"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(WORLD).iloc[:600].reset_index(drop=True)


@pytest.fixture(scope="module")
def chgnet() -> CHGNetBackbone:
    backbone = load_backbone("chgnet")
    assert isinstance(backbone, CHGNetBackbone)
    return backbone


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingStore:
    return EmbeddingStore(tmp_path_factory.mktemp("emb") / "embeddings.sqlite")


def make_engine(pool: CandidatePool, store: EmbeddingStore, backbone: Any = None, *, head: str = "gp",
                extensive: bool = False, seed: int = 0, **options: Any) -> Engine:
    return Engine(
        objective=NS(goal="minimize", extensive=extensive),
        model=NS(name="gnn-ensemble", options={"head": head, "members": 6, **options}),
        acquisition=NS(function="qucb", batch_size=4, beta=2.0), seed=seed, pool=pool,
        initial_design=NS(strategy="random", size=8), embedding_store=store, backbone=backbone,
    )


def observe(eng: Engine, pool: CandidatePool, values: np.ndarray, rows: Any) -> None:
    eng.observe([Observation(pool.keys[int(i)], {}, float(values[int(i)])) for i in rows])


def test_backbone_embeds_real_crystals_with_an_informative_prior(chgnet: CHGNetBackbone, frame: pd.DataFrame) -> None:
    structures = [Structure.from_str(t, fmt="cif") for t in frame["cif"].iloc[:120]]
    feats = chgnet.featurize(structures)
    assert feats.embeddings.shape == (120, chgnet.dim) and feats.embeddings.dtype == np.float32
    assert not feats.errors and np.isfinite(feats.embeddings).all() and np.isfinite(feats.prior).all()
    # the zero-shot prior already orders formation energies before any label (0.84 on all of CMR)
    assert np.corrcoef(feats.prior, frame["e_form"].iloc[:120])[0, 1] > 0.6
    assert chgnet.version.startswith("chgnet-0.3.0-") and chgnet.version.endswith("-f2")
    # a supercell is the same crystal: same features per atom, same prior per atom
    big = structures[0].copy()
    big.make_supercell([2, 1, 1])
    sc = chgnet.featurize([big])
    np.testing.assert_allclose(sc.embeddings[0], feats.embeddings[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sc.prior[0], feats.prior[0], atol=1e-5)
    # batching does not change the features
    one = chgnet.featurize(structures[:3])
    np.testing.assert_allclose(one.embeddings, feats.embeddings[:3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["gp", "mlp"])
def test_pretrained_engine_proposes_and_reports_held_out_metrics(frame: pd.DataFrame, store: EmbeddingStore,
                                                                  chgnet: CHGNetBackbone, head: str) -> None:
    pool = CandidatePool.from_frame(frame.iloc[:300], structure_column="cif", formula_column="formula",
                                    source="perovskites_2k[:300]")
    y = frame["e_form"].to_numpy()
    eng = make_engine(pool, store, chgnet, head=head)
    seen: set[str] = set()
    for _ in range(5):
        batch = eng.propose()
        keys = {p.key for p in batch}
        assert len(keys) == 4 and not keys & seen
        seen |= keys
        observe(eng, pool, y, [pool.index_of(k) for k in keys])
    assert batch[0].strategy == "gnn-ensemble" and batch[0].predicted_std is not None and batch[0].predicted_std > 0
    m = eng.uncertainty_metrics()  # held-out predictions of the fitted model, no refit
    assert m["held_out"] == ("leave-one-out" if head == "gp" else "out-of-bag")
    assert m["n_train"] == 16 and m["model_version"] == eng.model_version and m["n"] >= 4
    assert 0.0 <= m["coverage_68"] <= m["coverage_95"] <= 1.0 and m["mae"] < float(np.std(y))
    assert ("spread_scale" in m) == (head == "mlp")
    version = eng.model_version
    assert eng.uncertainty_metrics()["model_version"] == version  # asking again does not refit


@pytest.mark.parametrize("head", ["gp", "mlp"])
def test_recalibrated_95_interval_covers_held_out_real_crystals(frame: pd.DataFrame, store: EmbeddingStore,
                                                                 chgnet: CHGNetBackbone, head: str) -> None:
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula",
                                    source="perovskites_2k[:600]")
    y = frame["e_form"].to_numpy()
    eng = make_engine(pool, store, chgnet, head=head, members=8, seed=0)
    perm = np.random.default_rng(0).permutation(len(pool))
    train, test = perm[:150], perm[150:]
    observe(eng, pool, y, train)
    eng.fit()
    mean, std = eng.predict_pool()
    m = uncertainty_metrics(y[test], mean.numpy()[test], std.numpy()[test])
    assert 0.85 <= m["coverage_95"] <= 0.99, m
    assert m["mae"] < 0.5 * float(np.mean(np.abs(y[test] - np.median(y[train]))))  # far better than the median


def test_intensive_targets_are_not_scaled_and_extensive_ones_are(frame: pd.DataFrame, store: EmbeddingStore,
                                                                 chgnet: CHGNetBackbone) -> None:
    """Pool of real crystals and their 1x1x2 supercells: same crystal, twice the atoms."""
    base = frame.iloc[:120]
    doubled = []
    for text in base["cif"]:
        s = Structure.from_str(text, fmt="cif")
        s.make_supercell([1, 1, 2])
        doubled.append(s.to(fmt="cif"))
    both = pd.concat([base.assign(id=base["id"].astype(str)),
                      base.assign(id=base["id"].astype(str) + "x2", cif=doubled)], ignore_index=True)
    pool = CandidatePool.from_frame(both, id_column="id", structure_column="cif", formula_column="formula",
                                    source="cells-and-supercells")
    assert list(pool.n_atoms()[[0, 120]]) == [5.0, 10.0]
    n = len(base)
    train = np.r_[np.arange(0, 40), np.arange(n + 40, n + 80)]  # primitive cells of some, supercells of others
    per_cell = both["e_form"].to_numpy() * pool.n_atoms() / 5.0  # the 5-atom cell's value, doubled for 10
    per_atom = both["e_form"].to_numpy() / 5.0  # the same for a cell and its supercell
    for extensive, values in [(False, per_atom), (True, per_cell)]:
        eng = make_engine(pool, store, chgnet, extensive=extensive)
        observe(eng, pool, values, train)
        eng.propose()
        mean, _ = eng.predict_pool()
        unseen = np.arange(80, 120)
        cell, supercell = mean.numpy()[unseen], mean.numpy()[unseen + n]
        np.testing.assert_allclose(supercell, 2.0 * cell if extensive else cell, rtol=1e-3, atol=1e-3)
        # and the predictions are right in the units of the label
        err = np.abs(mean.numpy()[unseen + n] - values[unseen + n]).mean()
        assert err < np.abs(values[unseen + n] - np.median(values[train])).mean()


def test_second_round_and_second_campaign_hit_the_cache(frame: pd.DataFrame, tmp_path: Path,
                                                        chgnet: CHGNetBackbone) -> None:
    texts = list(frame["cif"].iloc[:40])
    store = EmbeddingStore(tmp_path / "emb.sqlite")
    progress: list[tuple[int, int]] = []
    first = featurize_texts(chgnet, texts + texts[:5], store, progress=lambda d, t: progress.append((d, t)))
    assert store.misses == 40 and store.hits == 0 and store.count(chgnet.version) == 40  # duplicates once
    assert progress[-1] == (40, 40)
    np.testing.assert_array_equal(first.embeddings[40:], first.embeddings[:5])
    pool = CandidatePool.from_frame(frame.iloc[:40], structure_column="cif", source="first-40")
    eng = make_engine(pool, store, chgnet)
    y = frame["e_form"].to_numpy()
    for _ in range(3):  # three rounds: read from the cache once, then kept in memory
        observe(eng, pool, y, [pool.index_of(p.key) for p in eng.propose()])
    assert store.misses == 40 and store.hits == 40
    resumed = make_engine(pool, store, chgnet)  # a rerun of the campaign
    resumed.prepare()
    assert store.misses == 40 and store.hits == 80
    again = EmbeddingStore(tmp_path / "emb.sqlite")  # another process, another campaign
    second = featurize_texts(chgnet, texts, again)
    assert again.hits == 40 and again.misses == 0
    np.testing.assert_array_equal(second.embeddings, first.embeddings[:40])
    np.testing.assert_array_equal(second.prior, first.prior[:40])
    assert (first.n_atoms == 5).all() and (second.n_atoms == 5).all()  # kept for extensive targets


def test_parallel_workers_give_the_same_features(frame: pd.DataFrame, tmp_path: Path, chgnet: CHGNetBackbone) -> None:
    texts = list(frame["cif"].iloc[40:88])
    serial = featurize_texts(chgnet, texts, None)
    parallel = featurize_texts(chgnet, texts, EmbeddingStore(tmp_path / "e.sqlite"), workers=2, chunk=24)
    np.testing.assert_allclose(parallel.embeddings, serial.embeddings, rtol=1e-5, atol=1e-6)


def test_unfeaturisable_candidates_are_excluded_and_named(frame: pd.DataFrame, store: EmbeddingStore,
                                                          chgnet: CHGNetBackbone,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    isolated = Structure(Lattice.cubic(30.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    americium = Structure(Lattice.cubic(4.0), ["Am", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    bad = pd.DataFrame({"id": ["isolated", "americium", "garbage"],
                        "cif": [isolated.to(fmt="cif"), americium.to(fmt="cif"), "data_x\nnot a cif"]})
    good = frame.iloc[:30][["id", "cif"]].assign(id=lambda d: d["id"].astype(str))
    pool = CandidatePool.from_frame(pd.concat([bad, good], ignore_index=True), id_column="id", structure_column="cif",
                                    source="mixed.csv")
    eng = make_engine(pool, store, chgnet, extensive=True)
    with caplog.at_level("WARNING", logger="sdl"):
        eng.prepare()
    assert set(eng.excluded) == {"isolated", "americium", "garbage"}
    assert "isolated atom" in eng.excluded["isolated"] and "Am" in eng.excluded["americium"]
    assert "cannot parse" in eng.excluded["garbage"]
    for key in eng.excluded:
        assert any("mixed.csv" in r.getMessage() and repr(key) in r.getMessage() for r in caplog.records)
    y = dict(zip(good["id"], frame["e_form"].iloc[:30], strict=True))
    proposed: set[str] = set()
    for _ in range(6):  # the rest of the pool goes on; excluded candidates are never proposed
        batch = eng.propose()
        proposed |= {p.key for p in batch}
        eng.observe([Observation(p.key, {}, y[p.key]) for p in batch])
    assert not proposed & set(eng.excluded) and len(proposed) == 24


def test_missing_or_corrupt_weights_fail_at_start_with_the_path(tmp_path: Path, frame: pd.DataFrame,
                                                                store: EmbeddingStore) -> None:
    missing = tmp_path / "nowhere" / "chgnet.pth.tar"
    with pytest.raises(BackboneError, match=str(missing)):
        CHGNetBackbone(weights=missing)
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=f"cannot load weights {corrupt}"):
        CHGNetBackbone(weights=corrupt)
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        load_backbone("nope")
    pool = CandidatePool.from_frame(frame.iloc[:10], structure_column="cif", source="p")
    eng = Engine(objective=NS(goal="minimize"),
                 model=NS(name="gnn-ensemble", options={"backbone": "sdl.engine.models.backbones.nowhere:Missing"}),
                 acquisition=NS(function="qucb", batch_size=2), pool=pool, embedding_store=store)
    missing_backbone = r"model\.options\.backbone: backbone 'sdl\.engine\.models\.backbones\.nowhere:Missing'"
    with pytest.raises(EngineError, match=missing_backbone):
        eng.prepare()


class CompositionBackbone:
    """A second, much simpler real backbone: element-fraction descriptors, no prior knowledge.

    Plugged in by import path exactly as a user's own model would be (``module:Class``).
    """

    name = "composition-test"
    version = "composition-test-1"
    prior_name = "none (zero)"

    def __init__(self) -> None:
        from sdl.engine.models.composition import composition_features

        self._features = composition_features
        self.dim = int(composition_features(["NaCl"]).shape[1])

    def featurize(self, structures: Any, progress: Any = None) -> Featurization:
        emb = self._features([s.composition.formula for s in structures]).astype(np.float32)
        return Featurization(emb, np.zeros(len(structures)))


def test_a_second_backbone_plugs_in_by_import_path(frame: pd.DataFrame, store: EmbeddingStore) -> None:
    backbone = load_backbone(f"{__name__}:CompositionBackbone")
    assert backbone.version == "composition-test-1"
    pool = CandidatePool.from_frame(frame.iloc[:200], structure_column="cif", formula_column="formula", source="p200")
    eng = Engine(objective=NS(goal="minimize"),
                 model=NS(name="gnn-ensemble", options={"backbone": f"{__name__}:CompositionBackbone",
                                                        "use_prior": False}),
                 acquisition=NS(function="qucb", batch_size=4), seed=0, pool=pool,
                 initial_design=NS(strategy="random", size=8), embedding_store=store)
    y = frame["e_form"].to_numpy()
    for _ in range(3):
        observe(eng, pool, y, [pool.index_of(p.key) for p in eng.propose()])
    assert eng.backbone is not None and eng.backbone.name == "composition-test"
    assert store.count("composition-test-1") == 200


def test_prior_design_beats_random_before_any_label(frame: pd.DataFrame, store: EmbeddingStore,
                                                    chgnet: CHGNetBackbone) -> None:
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula", source="p600")
    y = frame["e_form"].to_numpy()
    eng = Engine(objective=NS(goal="minimize"), model=NS(name="gnn-ensemble", options={}),
                 acquisition=NS(function="qucb", batch_size=10), seed=0, pool=pool,
                 initial_design=NS(strategy="prior", size=10), embedding_store=store, backbone=chgnet)
    first = eng.propose()
    top = set(np.argsort(y)[: len(y) // 10])  # the best 10 %
    hits = sum(pool.index_of(p.key) in top for p in first)
    assert hits >= 5, f"the prior's first 10 picks hold {hits} of the top 10 % (random: 1 expected)"


def test_oob_calibration_rescales_an_overconfident_ensemble() -> None:
    gen = torch.Generator().manual_seed(0)
    n, members = 400, 8
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    truth_err = 0.5
    center = y + truth_err * torch.randn(n, generator=gen, dtype=torch.float64)  # the members' shared error
    preds = center + 0.05 * torch.randn(members, n, generator=gen, dtype=torch.float64)  # 10x too narrow
    oob = torch.rand(members, n, generator=gen) < 0.37
    scale, held = oob_calibration(y, preds, oob)
    assert held is not None and 5.0 < scale < 15.0
    z = (held.y - held.mean) / held.std
    assert 0.6 < float(np.mean(np.abs(z) < 1.96)) / 0.95 < 1.1
    one, _ = oob_calibration(y[:3], preds[:, :3], oob[:, :3])
    assert one == 1.0  # too few out-of-bag labels to recalibrate


def test_head_ensemble_is_reproducible_and_falls_back_to_the_prior_line() -> None:
    gen = torch.Generator().manual_seed(1)
    prior = torch.randn(300, generator=gen, dtype=torch.float64)
    X = standardized_inputs(torch.randn(300, 6, generator=gen).numpy(), prior.numpy())
    y = 2.0 * prior + 0.1 * torch.randn(300, generator=gen, dtype=torch.float64)
    opts = HeadOptions(members=4, epochs=50)
    a = HeadEnsemble(opts, seed=3, prior_column=6).fit(X[:30], y[:30])
    b = HeadEnsemble(opts, seed=3, prior_column=6).fit(X[:30], y[:30])
    torch.testing.assert_close(a.predict_members(X), b.predict_members(X))
    err = (a.predict_members(X).mean(0)[30:] - y[30:]).abs().mean()
    assert float(err) < 0.3 * float((y[30:] - y[:30].mean()).abs().mean())


@pytest.mark.parametrize("model", [["--model", "gnn-ensemble"], ["--model", "gnn-ensemble", "--head", "mlp"],
                                   ["--model", "gp"]])
def test_cli_model_evaluate_with_an_absolute_train_size(tmp_path: Path, model: list[str]) -> None:
    import json

    from typer.testing import CliRunner

    from sdl.cli.main import app

    out = tmp_path / "eval.json"
    cache = tmp_path / "emb.sqlite"
    args = ["model", "evaluate", "--data", str(WORLD), "--target", "e_form", "--max-rows", "150", "--train-size", "50",
            "--cache", str(cache), "--json", str(out), *model]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("n_train", "n_test", "mae", "rmse", "spearman_abs_error_std", "miscalibration_area", "coverage_68",
                "coverage_95", "fit_seconds", "predict_seconds"):
        assert key in data
    assert data["n_train"] == 50 and data["n_test"] == 100 and "coverage_95" in result.output
    if model[1] == "gnn-ensemble":
        assert data["head"] == ("mlp" if "mlp" in model else "gp") and data["backbone_version"].startswith("chgnet")
        assert data["mae"] < 0.35 and data["cache_misses"] == 150
        again = CliRunner().invoke(app, args)  # same crystals: all from the cache
        assert again.exit_code == 0 and json.loads(out.read_text())["cache_hits"] == 150
    bad = CliRunner().invoke(app, ["model", "evaluate", "--data", str(WORLD), "--target", "e_form", "--max-rows", "60",
                                   "--train-size", "59", *model])
    assert bad.exit_code == 2 and "--train-size" in bad.output
