"""Pool ensemble model, member sampler, acquisitions and batch selection on real predictions.

The member-prediction matrix comes from a real model: bootstrap ridge regressions on composition
descriptors of the shipped perovskites, fitted to their measured band gaps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from botorch.acquisition import qUpperConfidenceBound
from botorch.sampling.index_sampler import IndexSampler

from sdl.engine.acquisition import build_acquisition, qMaxVariance
from sdl.engine.models.composition import composition_features
from sdl.engine.models.gp import fit_gp
from sdl.engine.models.pool_ensemble import MemberSampler, PoolEnsembleModel
from sdl.engine.objectives import Objective
from sdl.engine.optim import greedy_select, thompson_select, top_k

PEROV = Path(__file__).resolve().parent.parent / "simulators" / "worlds" / "perovskites_2k.csv.gz"
M = 5


def ridge_members(F: np.ndarray, y: np.ndarray, train: np.ndarray, members: int, seed: int) -> np.ndarray:
    """``members x N`` predictions of bootstrap ridge models fitted on rows ``train``."""
    mu, sd = F.mean(0), F.std(0) + 1e-9
    Z = np.hstack([(F - mu) / sd, np.ones((F.shape[0], 1))])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(members):
        b = rng.choice(train, size=train.size, replace=True)
        A = Z[b].T @ Z[b] + 1.0 * np.eye(Z.shape[1])
        out.append(Z @ np.linalg.solve(A, Z[b].T @ y[b]))
    return np.stack(out)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    frame = pd.read_csv(PEROV, usecols=["id", "formula", "gap_gllbsc"])
    F = composition_features(frame["formula"])
    y = frame["gap_gllbsc"].to_numpy()
    preds = torch.as_tensor(ridge_members(F, y, np.arange(0, 2000, 4), M, seed=0))
    return F, y, preds


def test_ensemble_posterior_has_botorch_shapes(data) -> None:
    _, _, preds = data
    model = PoolEnsembleModel(preds)
    X = torch.tensor([[[3.0], [7.0]], [[11.0], [0.0]], [[5.0], [5.0]]], dtype=torch.float64)  # batch 3 x q 2 x 1
    post = model.posterior(X)
    assert post.mean.shape == (3, 2, 1) and post.variance.shape == (3, 2, 1)
    assert post.values.shape == (3, M, 2, 1) and post.ensemble_size == M
    torch.testing.assert_close(post.mean[1, 0, 0], preds[:, 11].mean())
    samples = MemberSampler(M)(post)
    assert samples.shape == (M, 3, 2, 1)
    torch.testing.assert_close(samples[:, 0, 1, 0], preds[:, 7])  # sample s is member s, each once
    assert model.posterior(torch.tensor([[4.0]], dtype=torch.float64)).mean.shape == (1, 1)
    with pytest.raises(IndexError):
        model.posterior(torch.tensor([[[2000.0]]], dtype=torch.float64))


def test_member_sampler_is_deterministic_where_index_sampler_is_not(data) -> None:
    _, _, preds = data
    model = PoolEnsembleModel(preds)
    X = torch.arange(400, dtype=torch.float64).reshape(400, 1, 1)
    ucb = qUpperConfidenceBound(model, beta=4.0, sampler=MemberSampler(M))
    whole = ucb(X)
    chunked = torch.cat([ucb(part) for part in X.split(37)])
    torch.testing.assert_close(whole, chunked)
    # Exact ensemble formula: mean + sqrt(beta*pi/2) * mean |member - mean|.
    p = preds[:, :400]
    expected = p.mean(0) + math.sqrt(4.0 * math.pi / 2) * (p - p.mean(0)).abs().mean(0)
    torch.testing.assert_close(whole, expected)
    rnd = qUpperConfidenceBound(model, beta=4.0, sampler=IndexSampler(torch.Size([M]), seed=0))
    assert not torch.allclose(rnd(X), torch.cat([rnd(part) for part in X.split(37)]))


@pytest.mark.parametrize("name", ["qucb", "qlogei", "qlognei", "max-variance"])
def test_every_acquisition_scores_ensemble_and_gp_with_pending(data, name: str) -> None:
    F, y, preds = data
    obj = Objective("target", target_range=(1.1, 1.7))
    train = np.arange(0, 60)
    ens = PoolEnsembleModel(preds)
    idx = torch.arange(2000, dtype=torch.float64).unsqueeze(-1)
    acqf = build_acquisition(name, ens, obj, X_baseline=idx[train], y_baseline=torch.as_tensor(y[train]),
                             X_pending=idx[[100, 101]], seed=0)
    vals = torch.cat([acqf(p) for p in idx[200:600].unsqueeze(-2).split(128)])
    assert vals.shape == (400,) and torch.isfinite(vals).all()
    Xf = torch.as_tensor(F)
    gp = fit_gp(Xf[train], torch.as_tensor(y[train]))
    acqf = build_acquisition(name, gp, obj, X_baseline=Xf[train], y_baseline=torch.as_tensor(y[train]),
                             X_pending=Xf[[100, 101]], seed=0)
    assert torch.isfinite(acqf(Xf[200:300].unsqueeze(-2))).all()


def test_max_variance_is_the_ensemble_spread(data) -> None:
    _, _, preds = data
    acqf = qMaxVariance(PoolEnsembleModel(preds), sampler=MemberSampler(M))
    X = torch.arange(50, dtype=torch.float64).reshape(50, 1, 1)
    p = preds[:, :50]
    torch.testing.assert_close(acqf(X), math.sqrt(math.pi / 2) * (p - p.mean(0)).abs().mean(0))
    picks, _ = greedy_select(acqf, torch.arange(2000, dtype=torch.float64).unsqueeze(-1), q=1)
    assert picks[0] == int(torch.argmax((preds - preds.mean(0)).abs().mean(0)))


def test_target_objective_prefers_in_range_candidates(data) -> None:
    _, _, preds = data
    ens = PoolEnsembleModel(preds)
    mean = preds.mean(0)
    lo, hi = (float(v) for v in torch.quantile(mean, torch.tensor([0.55, 0.70], dtype=torch.float64)))
    obj = Objective("target", target_range=(lo, hi))  # a band in the middle of the predicted gaps
    choices = torch.arange(2000, dtype=torch.float64).unsqueeze(-1)
    acqf = build_acquisition("qlogei", ens, obj, X_baseline=choices[:1], y_baseline=torch.tensor([0.0]), seed=0)
    first, _ = greedy_select(acqf, choices, q=1)
    picks = top_k(acqf(choices.unsqueeze(-2)), 8)  # the 8 best single candidates
    assert int(first[0]) == int(picks[0])
    in_range = ((mean >= lo) & (mean <= hi)).double()
    assert in_range.mean() < 0.2  # in-range predictions are a small minority of the pool ...
    assert in_range[picks].mean() >= 0.75  # ... but most of the best-scored ones
    picks_max, _ = greedy_select(
        build_acquisition("qlogei", ens, Objective("maximize"), X_baseline=choices[:1],
                          y_baseline=torch.tensor([0.0]), seed=0), choices, q=8)
    assert float(mean[picks_max].min()) > hi  # maximize goes elsewhere


def test_greedy_and_thompson_batches_are_distinct(data) -> None:
    _, _, preds = data
    acqf = build_acquisition("qucb", PoolEnsembleModel(preds), Objective("maximize"),
                             X_baseline=torch.zeros(1, 1), y_baseline=torch.tensor([0.0]), seed=0)
    choices = torch.arange(2000, dtype=torch.float64).unsqueeze(-1)
    picks, _vals = greedy_select(acqf, choices, q=6, chunk=300)
    assert len(set(picks)) == 6 and acqf.X_pending is None
    assert picks[0] == int(torch.argmax(acqf(choices.unsqueeze(-2))))
    tp, _ = thompson_select(preds[:, :10], Objective("maximize"), q=10)
    assert sorted(tp) == list(range(10))
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2).tolist() == [1, 2]
