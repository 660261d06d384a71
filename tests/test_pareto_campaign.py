"""The several-objective campaign end to end: a real Prefect flow against the simulators, and ``sdl benchmark``.

Both start from ``campaigns/perovskite-pareto.yaml`` with a smaller world (the 400-crystal demo slice
of the same CMR table), the composition GP and a small budget, to stay fast.
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from campaign_files import PEROVSKITE_WORLD as WORLD
from campaign_files import write_pareto_campaign


def small_campaign(tmp_path: Path, name: str, budget: int = 6, constrained: bool = True) -> Path:
    return write_pareto_campaign(tmp_path, name, budget=budget, constrained=constrained)


def truth() -> pd.DataFrame:
    with gzip.open(WORLD, "rt") as handle:
        return pd.read_csv(handle, usecols=["id", "e_form", "gap_gllbsc"]).set_index("id")


@pytest.mark.slow
def test_flow_runs_the_pareto_campaign_and_shows_the_front(harness: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from sdl.engine.pareto import MultiObjective
    from sdl.flows import artifact_key, run_campaign
    from sdl.repository import Store

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = f"pareto-{uuid.uuid4().hex[:6]}"
    path = small_campaign(tmp_path, name, constrained=False)
    db = f"sqlite:///{tmp_path / 'sdl.db'}"
    summary = run_campaign(path, db_url=db)
    assert summary["state"] == "completed" and summary["counts"]["completed"] == 6
    assert summary["pareto_front"], "without constraints every campaign has a front"

    world = truth()
    store = Store.from_url(db)
    try:
        experiments = store.experiments(summary["campaign_id"])
        assert len(experiments) == 6
        assert {e.model_version.split("-")[0] for e in experiments} == {"design", "gp"}
        for e in experiments:  # the station measured both properties of every sample
            got = {m.property: m.value for m in store.measurements(experiment_id=e.id) if m.quality == "ok"}
            assert got == pytest.approx({"e_form": world.e_form[e.candidate_key],
                                         "gap_gllbsc": world.gap_gllbsc[e.candidate_key]})
    finally:
        store.close()

    from sdl.config import load_campaign

    mo = MultiObjective.from_campaign(load_campaign(path))
    keys = [e.candidate_key for e in experiments]
    Y = world.loc[keys, ["e_form", "gap_gllbsc"]].to_numpy()
    front = {keys[i] for i in np.flatnonzero(mo.front(Y))}
    assert {r["candidate"] for r in summary["pareto_front"]} == front
    assert summary["hypervolume"] == pytest.approx(mo.hypervolume(Y, mo.reference_utility()))

    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(name, "pareto-front")])))
        plot = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(name, "plot-pareto-front")])))
    assert len(table) == 1 and len(plot) == 1, "one card per key, updated in place every round"
    rows = json.loads(table[0].data)
    assert {r["candidate"] for r in rows} == front and "gap_gllbsc (eV)" in rows[0]
    assert "hypervolume" in table[0].description and "data:image/png;base64," in plot[0].data


def test_benchmark_writes_a_hypervolume_curve_per_strategy_and_seed(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdl.cli.main import app

    path = small_campaign(tmp_path, "pareto-bench", budget=7)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["benchmark", str(path), "--seeds", "2", "--initial", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["strategies"]) == {"random", "gp"}
    from sdl.config import load_campaign
    from sdl.engine.pareto import MultiObjective

    mo = MultiObjective.from_campaign(load_campaign(path))
    world = truth()
    ref = mo.reference_utility()
    pool_front = results["objectives"]["pool_front"]
    assert sorted(pool_front) == sorted(world.index[mo.front(world.to_numpy())])
    assert results["n_top"] == len(pool_front) and results["objectives"]["reference_point"] == [1.0, 1.5]
    whole = mo.hypervolume(world.to_numpy(), ref)
    assert results["objectives"]["pool_hypervolume"] == pytest.approx(whole)
    for s in results["strategies"].values():
        curves = s["hypervolume"]
        assert len(curves) == 2 and all(len(c) == 7 for c in curves)
        for c, keys in zip(curves, s["keys"], strict=True):
            assert all(0.0 <= v <= 1.0 + 1e-9 for v in c) and bool(np.all(np.diff(c) >= 0))
            for k in (3, 7):  # after k experiments: the measured designs' own hypervolume / the pool front's
                assert c[k - 1] == pytest.approx(mo.hypervolume(world.loc[keys[:k]].to_numpy(), ref) / whole)
    assert (out / "hypervolume.png").read_bytes()[:4] == b"\x89PNG"
    assert "hypervolume / pool front's" in result.output
