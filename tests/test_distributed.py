"""Pool chunks on a real Dask cluster give the proposals of the in-process engine.

Real components throughout: a ``distributed.LocalCluster`` (two workers, threads of this process
so that the test stays fast; the benchmark runs worker processes), real CHGNet features of real
CMR perovskites, real BoTorch GPs and head ensembles, the real ``sdl`` console entry point.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from sdl.config import CampaignConfigError, load_campaign, validate_campaign_dict
from sdl.engine import Engine, Observation
from sdl.engine.distributed import ComputeError, DaskCompute, check_address, compute_from_config
from sdl.engine.models import embedding_store
from sdl.engine.models.embedding_store import EmbeddingStore
from sdl.engine.models.extensive import RowScaledModel
from sdl.engine.models.gp import GPPredictor, fit_gp, predict_gp
from sdl.engine.models.surrogate import digest
from sdl.engine.optim import StreamingTopK, top_k
from sdl.engine.space import CandidatePool

ROOT = Path(__file__).resolve().parent.parent
WORLDS = ROOT / "simulators" / "worlds"


@pytest.fixture(scope="module")
def cluster() -> Iterator[DaskCompute]:
    with DaskCompute(workers=2, processes=False, chunk=50) as compute:
        yield compute.connect()


@pytest.fixture(scope="module")
def crystals() -> pd.DataFrame:
    return pd.read_csv(WORLDS / "perovskites_2k.csv.gz").iloc[:40].reset_index(drop=True)


@pytest.fixture(scope="module")
def barrels() -> pd.DataFrame:
    return pd.read_csv(WORLDS / "crossed_barrel.csv").drop_duplicates(["n", "theta", "r", "t"]).reset_index(drop=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_rounds(eng: Engine, values: np.ndarray, q: int = 4) -> list[Any]:
    design = eng.propose(10)
    eng.observe([Observation(p.key, {}, float(values[eng.pool.index_of(p.key)])) for p in design])  # type: ignore[union-attr]
    first = eng.propose(q)
    return first + eng.propose(q, pending=[p.key for p in first])


def test_streaming_top_k_is_the_top_k_of_the_whole_pool_in_any_chunk_order() -> None:
    rng = np.random.default_rng(0)
    scores = torch.as_tensor(rng.integers(0, 40, 1000), dtype=torch.float64)  # many ties
    rows = np.sort(rng.choice(5000, 1000, replace=False))
    want = rows[top_k(scores, 37).numpy()]
    chunks = [(rows[s : s + 64], scores[s : s + 64]) for s in range(0, 1000, 64)]
    for order in (range(len(chunks)), rng.permutation(len(chunks))):
        top = StreamingTopK(37)
        for i in order:
            top.add(*chunks[i])
        np.testing.assert_array_equal(top.rows(), want)


def test_cached_cholesky_predictor_equals_the_gp_posterior(barrels: pd.DataFrame) -> None:
    X = torch.tensor(barrels[["n", "theta", "r", "t"]].to_numpy(), dtype=torch.float64)
    y = torch.tensor(barrels["toughness"].to_numpy(), dtype=torch.float64)
    bounds = torch.stack([X.min(0).values, X.max(0).values])
    gp = fit_gp(X[::20], y[::20], bounds=bounds)
    want_mean, want_std = predict_gp(gp, X)
    mean, std = GPPredictor(gp)(X)
    torch.testing.assert_close(mean, want_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(std, want_std, rtol=1e-6, atol=1e-8)
    scaled = torch.cat([X, 1.0 + X[:, :1]], dim=1)  # an extensive target: the last column scales each row
    want_mean, want_std = predict_gp(RowScaledModel(gp), scaled)
    mean, std = GPPredictor(RowScaledModel(gp))(scaled)
    torch.testing.assert_close(mean, want_mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(std, want_std, rtol=1e-6, atol=1e-8)


def barrel_engine(frame: pd.DataFrame, compute: DaskCompute | None, prefilter_k: int, function: str) -> Engine:
    pool = CandidatePool.from_frame(frame, parameter_columns=["n", "theta", "r", "t"], source="crossed_barrel")
    return Engine(objective=NS(goal="maximize"), model=NS(name="gp", options={}),
                  acquisition=NS(function=function, batch_size=4, beta=2.0), seed=3, pool=pool,
                  initial_design=NS(strategy="random", size=10), prefilter_k=prefilter_k, compute=compute)


@pytest.mark.parametrize("function", ["qucb", "thompson"])
def test_gp_pool_scored_on_the_cluster_proposes_what_the_process_does(
    barrels: pd.DataFrame, cluster: DaskCompute, function: str
) -> None:
    y = barrels["toughness"].to_numpy()
    here = two_rounds(barrel_engine(barrels, None, 64, function), y)
    there = two_rounds(barrel_engine(barrels, cluster, 64, function), y)  # 600 rows: 12 chunks, any order
    assert [p.key for p in there] == [p.key for p in here]
    np.testing.assert_allclose([p.predicted_mean for p in there], [p.predicted_mean for p in here], rtol=1e-9)
    np.testing.assert_allclose([p.predicted_std for p in there], [p.predicted_std for p in here], rtol=1e-7)
    assert len(cluster._scattered) == 1  # the pool's inputs went to the workers


def test_a_pool_smaller_than_the_shortlist_gets_the_exact_full_scoring_picks(barrels: pd.DataFrame) -> None:
    """The shortlist only cuts pools larger than it; below that, the acquisition sees every candidate."""
    from sdl.engine.acquisition import build_acquisition
    from sdl.engine.optim import greedy_select

    y = barrels["toughness"].to_numpy()
    eng = barrel_engine(barrels, None, 2048, "qucb")
    design = eng.propose(10)
    eng.observe([Observation(p.key, {}, float(y[eng.pool.index_of(p.key)])) for p in design])  # type: ignore[union-attr]
    picks = [eng.pool.index_of(p.key) for p in eng.propose(4)]  # type: ignore[union-attr]
    X = eng.surrogate.inputs()
    rows = np.array([i for i in range(len(barrels)) if eng.pool.keys[i] not in eng.measured_keys])  # type: ignore[union-attr]
    acqf = build_acquisition("qucb", eng.surrogate.model, eng.objective, X_baseline=X[torch.as_tensor(
        [eng.pool.index_of(k) for k in sorted(eng.measured_keys)])], y_baseline=torch.as_tensor(  # type: ignore[union-attr]
        [o.value for o in eng.observations]), beta=2.0, seed=int(digest(3, 10, [], n=8), 16))
    exact, _ = greedy_select(acqf, X[torch.as_tensor(rows)], 4)
    assert picks == rows[exact].tolist()
    # with a shortlist of 16 the same pool is cut first: those picks come from 16 rows only
    cut = barrel_engine(barrels, None, 16, "qucb")
    cut.observe(eng.observations)
    assert len(cut.propose(4)) == 4


def crystal_engine(frame: pd.DataFrame, store: EmbeddingStore, compute: DaskCompute | None, head: str,
                   backbone: Any) -> Engine:
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula", source="cmr40")
    return Engine(objective=NS(goal="minimize"), model=NS(name="gnn-ensemble", options={"head": head, "members": 4}),
                  acquisition=NS(function="qucb", batch_size=4, beta=2.0), seed=0, pool=pool,
                  initial_design=NS(strategy="random", size=10), embedding_store=store, compute=compute,
                  prefilter_k=16, backbone=backbone)


def test_crystals_featurised_and_scored_on_the_cluster_match_the_process(
    crystals: pd.DataFrame, cluster: DaskCompute, tmp_path: Path
) -> None:
    from sdl.engine.models.backbones import load_backbone

    y = crystals["e_form"].to_numpy()
    chgnet = load_backbone("chgnet")  # the engines' own; the workers load theirs by name
    embedding_store._WORKER_BACKBONES.clear()
    here_store, there_store = EmbeddingStore(tmp_path / "here.sqlite"), EmbeddingStore(tmp_path / "there.sqlite")
    for head in ("gp", "mlp"):  # the second head reads the features back from each store
        here = crystal_engine(crystals, here_store, None, head, chgnet)
        there = crystal_engine(crystals, there_store, cluster, head, chgnet)
        a, b = two_rounds(here, y), two_rounds(there, y)
        assert there.head_inputs is not None and here.head_inputs is not None
        torch.testing.assert_close(there.head_inputs, here.head_inputs, rtol=1e-5, atol=1e-5)
        assert [p.key for p in b] == [p.key for p in a], head
        np.testing.assert_allclose([p.predicted_mean for p in b], [p.predicted_mean for p in a], rtol=1e-5, atol=1e-6)
    assert "chgnet" in embedding_store._WORKER_BACKBONES  # featurised by the Dask workers, not by the engine


def test_compute_block_validates_and_stays_out_of_the_config_hash() -> None:
    base = load_campaign(ROOT / "campaigns" / "crossed-barrel.yaml", require_data=False)
    data = base.model_dump(mode="json")
    with_dask = validate_campaign_dict({**data, "compute": {"dask": "tcp://10.0.0.5:8786", "workers": 4}},
                                       require_data=False)
    assert with_dask.compute is not None and with_dask.compute.dask == "tcp://10.0.0.5:8786"
    without = validate_campaign_dict(data, require_data=False)
    assert with_dask.config_hash() == without.config_hash()  # where a pool is scored is no part of the campaign
    assert "compute" not in base.snapshot() and "compute" in with_dask.snapshot()
    compute = compute_from_config(with_dask.compute)
    assert compute is not None and compute.address == "tcp://10.0.0.5:8786" and compute.workers == 4
    assert compute_from_config(with_dask.compute) is compute  # one per process
    assert compute_from_config(with_dask.compute, "local") is not compute  # --dask wins over the YAML
    assert compute_from_config(None) is None
    for bad, field in (({"dask": "two machines"}, "compute.dask"), ({"chunk": 3}, "compute.chunk"),
                       ({"worker": 2}, "compute.worker")):
        with pytest.raises(CampaignConfigError, match=field.replace(".", r"\.")):
            validate_campaign_dict({**data, "compute": bad}, file="c.yaml", require_data=False)


def test_an_unreachable_scheduler_is_named_in_one_error() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ComputeError, match=address):
        check_address(address, timeout=2)
    check_address("local")  # nothing to reach


def sdl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdl.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "COLUMNS": "200", **env})


def test_cli_dask_with_an_unreachable_address_fails_in_one_line(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    db = tmp_path / "sdl.db"
    run = sdl("run", "campaigns/crossed-barrel.yaml", "--db", f"sqlite:///{db}", "--dask", address,
              PREFECT_HOME=str(tmp_path / "prefect"))
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and address in lines[0] and "--dask" in lines[0], run.stderr
    assert not db.exists()  # nothing started, nothing written
    from typer.testing import CliRunner

    from sdl.cli.main import app

    data = str(ROOT / "tests" / "data" / "mp_perovskites_12.csv")
    evaluate = CliRunner().invoke(app, ["model", "evaluate", "--data", data, "--target", "formation_energy", "--model",
                                        "gp", "--train-size", "8", "--dask", address, "--cache",
                                        str(tmp_path / "e.sqlite")])
    assert evaluate.exit_code == 2, evaluate.output
    lines = [line for line in evaluate.output.splitlines() if line.strip()]
    assert len(lines) == 1 and address in lines[0] and "--dask" in lines[0], evaluate.output
