"""GNN ensemble on real CMR perovskites: shapes, determinism, checkpoints, warm start, k-fold UQ."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from sdl.engine.models.ensemble import EnsembleOptions, GNNEnsemble
from sdl.engine.uq import kfold_uncertainty

WORLD = Path(__file__).resolve().parents[1] / "simulators" / "worlds" / "perovskites_demo.csv.gz"
SMALL = {"members": 3, "hidden": 16, "layers": 2, "epochs": 6, "patience": 3, "batch_size": 32, "rbf": 16}


@pytest.fixture(scope="module")
def data() -> tuple[list[Structure], np.ndarray, list[str]]:
    """120 real crystals with their formation energy (eV per 5-atom cell)."""
    df = pd.read_csv(WORLD).head(120)
    structures = [Structure.from_str(c, fmt="cif") for c in df["cif"]]
    return structures, df["e_form"].to_numpy(), df["id"].tolist()


@pytest.fixture(scope="module")
def fitted(data) -> tuple[GNNEnsemble, object]:
    structures, y, ids = data
    ens = GNNEnsemble(SimpleNamespace(**SMALL), seed=0)
    report = ens.fit(structures[:100], y[:100], ids[:100])
    return ens, report


def test_options_default_and_duck_typed() -> None:
    from sdl.config import GNNEnsembleOptions

    assert GNNEnsemble(None).options == EnsembleOptions()
    assert GNNEnsemble(GNNEnsembleOptions()).options == EnsembleOptions()
    ens = GNNEnsemble(SimpleNamespace(members=2, hidden=8, unrelated="x"), seed=3)
    assert ens.options.members == 2 and ens.options.hidden == 8 and ens.options.epochs == 150
    assert "members=2" in repr(ens) and "cutoff=6.0" in repr(ens)
    with pytest.raises(ValueError, match="members"):
        GNNEnsemble({"members": 0})


def test_predict_members_shape_and_units(data, fitted) -> None:
    structures, y, ids = data
    ens, report = fitted
    members = ens.predict_members(structures[100:], ids[100:], batch_size=7)
    assert members.shape == (3, 20) and members.dtype == torch.float64
    assert torch.isfinite(members).all()
    mean, std = ens.predict(structures[100:], ids[100:])
    assert mean.shape == (20,) and std.shape == (20,)
    torch.testing.assert_close(mean, members.mean(0))
    assert (std > 0).all(), "members must disagree somewhere"
    # in target units: the predictions live on the scale of e_form, not of the normalised target
    assert abs(float(mean.mean()) - float(y[:100].mean())) < 3 * float(y[:100].std())
    assert report.n == 100 and len(report.epochs_run) == 3 and not report.warm_start
    # the member-prediction chunks do not depend on the chunk size
    torch.testing.assert_close(members, ens.predict_members(structures[100:], ids[100:], batch_size=1024),
                               atol=1e-6, rtol=1e-6)  # float32 sums in another order


def test_training_improves_over_initial_weights(fitted) -> None:
    _, report = fitted
    assert all(b < i for b, i in zip(report.best_val_mae, report.initial_val_mae, strict=True))


def test_same_seed_same_predictions_other_seed_differs(data, fitted) -> None:
    structures, y, ids = data
    ens, _ = fitted
    again = GNNEnsemble(SimpleNamespace(**SMALL), seed=0)
    again.fit(structures[:100], y[:100], ids[:100])
    other = GNNEnsemble(SimpleNamespace(**SMALL), seed=1)
    other.fit(structures[:100], y[:100], ids[:100])
    a = ens.predict_members(structures[100:])
    assert torch.equal(a, again.predict_members(structures[100:]))
    assert not torch.allclose(a, other.predict_members(structures[100:]))


def test_checkpoint_round_trip(data, fitted) -> None:
    structures, _, _ = data
    ens, _ = fitted
    state = ens.state_dict()
    assert state["options"]["members"] == 3 and state["converter"]["cutoff"] == 6.0
    loaded = GNNEnsemble.from_state(state)
    assert torch.equal(loaded.predict_members(structures[100:]), ens.predict_members(structures[100:]))
    with pytest.raises(ValueError, match="format"):
        GNNEnsemble.from_state({"format": "other"})


def test_warm_start_reuses_weights_and_needs_fewer_epochs(data) -> None:
    structures, y, ids = data
    opts = dict(SMALL, members=2, epochs=40, patience=4)
    ens = GNNEnsemble(opts, seed=0)
    cold = ens.fit(structures[:100], y[:100], ids[:100])
    again = ens.fit(structures[:100], y[:100], ids[:100])  # same split and resample per member
    assert again.warm_start and not cold.warm_start
    # it starts exactly where the last round ended (best weights kept) ...
    assert again.initial_val_mae == pytest.approx(cold.best_val_mae, abs=1e-6)
    assert all(a <= c + 1e-9 for a, c in zip(again.best_val_mae, cold.best_val_mae, strict=True))
    # ... and so stops after fewer epochs than training from scratch
    assert sum(again.epochs_run) < sum(cold.epochs_run)
    # new measurements arrive: same API, same shapes
    grown = ens.fit(structures[:110], y[:110], ids[:110])
    assert grown.warm_start and grown.n == 110
    assert ens.predict_members(structures[110:]).shape == (2, 10)


def test_bad_targets_are_rejected(data) -> None:
    structures, y, _ = data
    ens = GNNEnsemble(SimpleNamespace(**SMALL))
    with pytest.raises(ValueError, match="y has"):
        ens.fit(structures[:10], y[:9])
    with pytest.raises(ValueError, match="NaN"):
        ens.fit(structures[:3], [1.0, float("nan"), 2.0])
    with pytest.raises(RuntimeError, match="before fit"):
        ens.predict_members(structures[:2])


def test_kfold_uncertainty_with_the_ensemble(data) -> None:
    structures, y, _ = data
    opts = dict(SMALL, members=2, epochs=3)

    def fit_predict(x_train, y_train, x_test):
        ens = GNNEnsemble(opts, seed=0)
        ens.fit(x_train, y_train)
        return ens.predict(x_test)

    result = kfold_uncertainty(fit_predict, structures[:60], y[:60], k=3, seed=0)
    assert result["n"] == 60 and result["k"] == 3 and len(result["folds"]) == 3
    assert len(result["oof_mean"]) == 60
    assert 0.0 <= result["miscalibration_area"] <= 0.5
    assert result["mae"] > 0


def test_cli_model_evaluate_writes_json(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from sdl.cli.main import app

    out = tmp_path / "eval.json"
    args = ["model", "evaluate", "--data", str(WORLD), "--target", "e_form", "--max-rows", "80",
            "--backbone", "scratch", "--members", "2", "--epochs", "2", "--hidden", "8", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("n_train", "n_test", "mae", "rmse", "spearman_abs_error_std", "miscalibration_area",
                "coverage_68", "coverage_95", "fit_seconds", "predict_seconds", "graph_seconds"):
        assert key in data
    assert data["n_train"] == 64 and data["n_test"] == 16 and data["members"] == 2
    assert "miscalibration_area" in result.output

    bad = CliRunner().invoke(app, ["model", "evaluate", "--data", str(WORLD), "--target", "no_such_column"])
    assert bad.exit_code == 2
    assert "no_such_column" in bad.output and WORLD.name in bad.output
    assert "Traceback" not in bad.output
