"""GP baseline and composition descriptors on the shipped real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sdl.engine.models.composition import FEATURE_NAMES, composition_features
from sdl.engine.models.gp import fit_gp, predict_gp
from sdl.engine.space import CandidatePool

WORLDS = Path(__file__).resolve().parent.parent / "simulators" / "worlds"


def test_gp_on_crossed_barrel_beats_the_mean_predictor() -> None:
    pool = CandidatePool.from_csv(
        WORLDS / "crossed_barrel.csv", id_column=None, parameter_columns=["n", "theta", "r", "t"]
    )
    X, y = pool.parameter_matrix(), torch.as_tensor(pool.values("toughness"))
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    tr, te = perm[:120], perm[120:]
    model = fit_gp(X[tr], y[tr], bounds=pool.space.bounds)
    mean, std = predict_gp(model, X[te], chunk=100)
    assert mean.shape == std.shape == (480,) and (std > 0).all()
    mae = (mean - y[te]).abs().mean()
    baseline = (y[tr].mean() - y[te]).abs().mean()
    assert mae < 0.6 * baseline, (float(mae), float(baseline))
    z = ((mean - y[te]) / std).abs()
    assert 0.4 < float((z < 1.96).double().mean()) <= 1.0  # intervals are not absurd


def test_composition_features_and_composition_gp() -> None:
    frame = pd.read_csv(WORLDS / "perovskites_2k.csv.gz", usecols=["formula", "e_form"])
    F = composition_features(frame["formula"])
    assert F.shape == (2000, len(FEATURE_NAMES)) == (2000, 30) and np.isfinite(F).all()
    i = FEATURE_NAMES.index("Z_max")
    assert F[0, i] == 82.0  # PbRuO3: Pb is the heaviest element
    assert F[0, FEATURE_NAMES.index("n_elements")] == 3.0
    X, y = torch.as_tensor(F), torch.tensor(frame["e_form"].to_numpy())
    model = fit_gp(X[:200], y[:200])
    mean, _ = predict_gp(model, X[1000:1500])
    assert (mean - y[1000:1500]).abs().mean() < 0.9 * (y[:200].mean() - y[1000:1500]).abs().mean()
    with pytest.raises(ValueError, match="cannot parse formula 'Xx2'"):
        composition_features(["Xx2"])


def test_gp_rejects_too_little_data() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_gp(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def test_gp_priors_option_reaches_the_fit() -> None:
    """``model.options.priors``: LogNormal by default (parameters and descriptors), Gamma lengthscales on request."""
    from gpytorch.priors import GammaPrior, LogNormalPrior

    from sdl import config as cfgmod
    from sdl.engine.engine import build_surrogate
    from sdl.engine.models.surrogate import TrainingData

    barrel = CandidatePool.from_csv(
        WORLDS / "crossed_barrel.csv", id_column=None, parameter_columns=["n", "theta", "r", "t"]
    )
    frame = pd.read_csv(WORLDS / "perovskites_2k.csv.gz", usecols=["id", "formula", "e_form"]).iloc[:400]
    perov = CandidatePool.from_frame(frame, formula_column="formula", source="perovskites_2k[:400]")
    rows = np.arange(0, 400, 20)
    for pool, target, priors, prior in [(barrel, "toughness", None, LogNormalPrior),
                                        (barrel, "toughness", "gamma", GammaPrior),
                                        (perov, "e_form", None, LogNormalPrior)]:
        opts = cfgmod.GPOptions() if priors is None else cfgmod.GPOptions(priors=priors)
        sur = build_surrogate(cfgmod.GPModel(name="gp", options=opts), seed=0, pool=pool, space=None)
        y = pool.values(target)[rows]
        sur.fit(TrainingData(tuple(pool.keys[i] for i in rows), tuple(float(v) for v in y), rows=rows))
        gp = sur._gp  # type: ignore[attr-defined]
        assert isinstance(gp.covar_module.lengthscale_prior, prior), (target, priors, gp.covar_module)
        assert isinstance(gp.likelihood.noise_covar.noise_prior, LogNormalPrior)
    with pytest.raises(ValueError, match="priors must be one of"):
        fit_gp(torch.rand(4, 2, dtype=torch.float64), torch.rand(4, dtype=torch.float64), priors="flat")
