"""The candidate-set posterior: greedy picks and values equal to those through the GP's own posterior."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sdl.engine.acquisition import build_acquisition, pool_acquisition
from sdl.engine.models.candidate_set import CandidateSetGP, candidate_set_model
from sdl.engine.models.composition import composition_features
from sdl.engine.models.extensive import RowScaledModel
from sdl.engine.models.gp import fit_gp
from sdl.engine.models.pool_ensemble import PoolEnsembleModel
from sdl.engine.objectives import Objective
from sdl.engine.optim import greedy_select

WORLDS = Path(__file__).resolve().parent.parent / "simulators" / "worlds"
N_TRAIN, N_SHORT = 48, 600


@pytest.fixture(scope="module")
def perov() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composition descriptors of the 2,000 shipped perovskites, e_form, atoms per cell; a GP on 48."""
    frame = pd.read_csv(WORLDS / "perovskites_2k.csv.gz", usecols=["formula", "e_form"])
    X = torch.as_tensor(composition_features(frame["formula"]))
    y = torch.as_tensor(frame["e_form"].to_numpy().copy())
    scale = torch.as_tensor(np.random.default_rng(0).choice([5.0, 10.0, 20.0], size=len(frame)))
    return X, y, scale


def both_paths(model: object, X_all: torch.Tensor, y: torch.Tensor, name: str, pending: list[int],
               q: int = 5) -> tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]:
    """Greedy picks over the shortlist through the candidate set, and through the model's posterior."""
    obj = Objective("minimize")
    short = np.arange(200, 200 + N_SHORT)
    base = list(range(N_TRAIN))
    # qLogNEI prunes its baseline (at construction and at each new pending point) with unseeded
    # draws: both paths start from the same global RNG state
    torch.manual_seed(0)
    fast, choices = pool_acquisition(name, model, obj, X_all, short, baseline_rows=base, y_baseline=y[:N_TRAIN],
                                     pending_rows=pending, seed=3)
    assert isinstance(fast.model, CandidateSetGP)
    assert torch.equal(choices, torch.arange(N_SHORT, dtype=torch.float64).unsqueeze(-1))
    fast_picks = greedy_select(fast, choices, q, chunk=256)
    torch.manual_seed(0)
    slow = build_acquisition(name, model, obj, X_baseline=X_all[base], y_baseline=y[:N_TRAIN],
                             X_pending=X_all[pending] if pending else None, seed=3)
    return fast_picks, greedy_select(slow, X_all[torch.as_tensor(short)], q, chunk=256)


@pytest.mark.parametrize("name", ["qucb", "qlognei", "qlogei", "max-variance"])
@pytest.mark.parametrize("pending", [[], [120, 121, 122]])
def test_candidate_set_picks_what_the_gp_posterior_picks(perov, name: str, pending: list[int]) -> None:
    X, y, _ = perov
    gp = fit_gp(X[:N_TRAIN], y[:N_TRAIN], bounds=torch.stack([X.min(0).values, X.max(0).values]))
    (fast_rows, fast_vals), (slow_rows, slow_vals) = both_paths(gp, X, y, name, pending)
    assert fast_rows == slow_rows and len(set(fast_rows)) == 5
    np.testing.assert_allclose(fast_vals, slow_vals, rtol=1e-6, atol=1e-9)


def test_row_scaled_gp_gets_the_candidate_set_too(perov) -> None:
    """Extensive targets: the per-row scale enters the set's mean and covariance as it enters the posterior."""
    X, y, scale = perov
    Xs = torch.cat([X, scale.unsqueeze(-1)], dim=-1)
    model = RowScaledModel(fit_gp(X[:N_TRAIN], y[:N_TRAIN] / scale[:N_TRAIN]))
    (fast_rows, fast_vals), (slow_rows, slow_vals) = both_paths(model, Xs, y, "qucb", [130, 131])
    assert fast_rows == slow_rows
    np.testing.assert_allclose(fast_vals, slow_vals, rtol=1e-6, atol=1e-9)
    rows = torch.tensor([3, 7, 7, 500])  # a repeated row: a singular joint covariance is fine to hold
    setgp = candidate_set_model(model, Xs[rows])
    assert setgp is not None
    post, ref = setgp.posterior(torch.arange(4.0).reshape(1, 4, 1)), model.posterior(Xs[rows].unsqueeze(0))
    torch.testing.assert_close(post.mean, ref.mean)
    torch.testing.assert_close(post.distribution.covariance_matrix, ref.distribution.covariance_matrix)


def test_other_models_keep_their_own_posterior(perov) -> None:
    """An ensemble (and a two-output GP) gets no candidate set: the acquisition runs on the pool rows."""
    X, y, _ = perov
    gen = torch.Generator().manual_seed(0)
    members = torch.stack([y + 0.1 * torch.randn(len(y), generator=gen, dtype=torch.float64) for _ in range(5)])
    ens = PoolEnsembleModel(members)
    rows = torch.arange(len(y), dtype=torch.float64).unsqueeze(-1)
    assert candidate_set_model(ens, rows[:10]) is None
    short = np.arange(300, 700)
    acqf, choices = pool_acquisition("qucb", ens, Objective("minimize"), rows, short, baseline_rows=[0, 1],
                                     y_baseline=y[:2], pending_rows=[5], seed=0)
    assert acqf.model is ens and torch.equal(choices, rows[torch.as_tensor(short)])
    picks, _ = greedy_select(acqf, choices, 4)
    assert len(set(picks)) == 4
    from botorch.models import SingleTaskGP

    two = SingleTaskGP(X[:20], torch.stack([y[:20], -y[:20]], dim=-1))
    assert candidate_set_model(two.eval(), X[:10]) is None
