"""Engine GP vs BayBE's GP on identical data: how well each ranks the unmeasured pool, and what each picks.

Why: the side-by-side tables say *that* BayBE's default needs fewer experiments on some sets, not
*why*. This script takes the training sets BayBE itself measured (its recorded ``order`` in a peer
results file, prefixes of ``--at`` experiments, the harness's replicate draws of that seed) and fits
on each: ``engine`` (:func:`sdl.engine.models.gp.fit_gp` with BoTorch's LogNormal priors, the
engine's recipe before this script), ``engine-gamma`` (``fit_gp(priors="gamma")``: BayBE's Gamma
lengthscale prior, LogNormal noise), ``baybe`` (BayBE's own ``GaussianProcessSurrogate``, fitted
through BayBE's API) and ``gamma`` (plain BoTorch with BayBE 0.15's Gamma lengthscale *and* noise
priors: it reproduces ``baybe``'s numbers exactly). Per fit: Spearman
correlation of the predicted mean with the true pool means on the unmeasured rows, whether the
arg-max of the mean / of qLogEI (best_f = best posterior mean at the measured rows, as BayBE) / of
qLogNEI (the engine's) is a top row, and the fitted lengthscales and noise. Run it with the peers
venv (it has BayBE; BoTorch and GPyTorch are the same versions as the engine's):

    ~/.cache/sdl-peers/venv/bin/python benchmarks/surrogate_diagnosis.py \\
        --peer-results benchmarks/results/peers/liang_autoam/results.json --at 5,10,15,20 \\
        -- --data ../shared/data/liang2021_bo_benchmark/AutoAM_dataset.csv --target Score --goal max \\
        --params "Prime Delay,Print Speed,X Offset Correction,Y Offset Correction" --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def fit_gamma(X: torch.Tensor, y: torch.Tensor, bounds: torch.Tensor) -> object:
    """The engine's GP with BayBE 0.15's numeric-only priors (Gamma(3) lengthscale, Gamma(2) noise)."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from gpytorch.constraints import GreaterThan
    from gpytorch.kernels import MaternKernel
    from gpytorch.likelihoods import GaussianLikelihood
    from gpytorch.mlls import ExactMarginalLogLikelihood
    from gpytorch.priors import GammaPrior

    d = X.shape[-1]
    ls = GammaPrior(3.0, 2.0 / math.exp(math.sqrt(2) - 3) / math.sqrt(d))
    nz = GammaPrior(2.0, 1.0 / math.exp(-5.0))
    model = SingleTaskGP(
        X, y.reshape(-1, 1),
        covar_module=MaternKernel(nu=2.5, ard_num_dims=d, lengthscale_prior=ls,
                                  lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=ls.mode)),
        likelihood=GaussianLikelihood(noise_prior=nz, noise_constraint=GreaterThan(1e-4, transform=None,
                                                                                  initial_value=nz.mode)),
        input_transform=Normalize(d=d, bounds=bounds), outcome_transform=Standardize(m=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    model.eval()
    return model


def fit_baybe(pool: object, idx: np.ndarray, y: np.ndarray) -> object:
    """BayBE's default GaussianProcessSurrogate fitted through its API; returns the BoTorch model inside."""
    import pandas as pd
    from baybe.objectives import SingleTargetObjective
    from baybe.searchspace import SearchSpace, SubspaceDiscrete
    from baybe.surrogates import GaussianProcessSurrogate
    from baybe.targets import NumericalTarget

    space = SearchSpace(discrete=SubspaceDiscrete.from_dataframe(pool.frame()))  # type: ignore[attr-defined]
    target = NumericalTarget(name=pool.target, minimize=False)  # type: ignore[attr-defined]
    meas = pd.DataFrame(pool.X[idx], columns=pool.params)  # type: ignore[attr-defined]
    meas[pool.target] = y  # type: ignore[attr-defined]
    sur = GaussianProcessSurrogate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sur.fit(space, SingleTargetObjective(target), meas)
    return sur._model


def analyse(model: object, Xall: torch.Tensor, idx: np.ndarray, util_true: np.ndarray, top: np.ndarray) -> dict:
    """Ranking and picks of ``model`` (fitted on utility = higher is better) over the unmeasured rows."""
    from botorch.acquisition import qLogExpectedImprovement, qLogNoisyExpectedImprovement
    from botorch.sampling.normal import SobolQMCNormalSampler
    from scipy.stats import spearmanr

    free = np.setdiff1d(np.arange(len(Xall)), idx)
    with torch.no_grad():
        post = model.posterior(Xall)  # type: ignore[attr-defined]
        mu = post.mean.reshape(-1).numpy()
        best_f = float(mu[idx].max())
        ei = qLogExpectedImprovement(model, best_f=best_f, sampler=SobolQMCNormalSampler(torch.Size([128]), seed=0))
        nei = qLogNoisyExpectedImprovement(model, X_baseline=Xall[idx], prune_baseline=True,
                                           sampler=SobolQMCNormalSampler(torch.Size([128]), seed=0))
        Xf = Xall[free].unsqueeze(1)
        a_ei = torch.cat([ei(c) for c in torch.split(Xf, 256)]).numpy()
        a_nei = torch.cat([nei(c) for c in torch.split(Xf, 256)]).numpy()
    m = model  # type: ignore[assignment]
    ls = m.covar_module.lengthscale.detach().reshape(-1).numpy()  # type: ignore[attr-defined]
    noise = float(m.likelihood.noise.detach().reshape(-1)[0])  # type: ignore[attr-defined]
    k = int(top.sum())
    rho = float(spearmanr(mu[free], util_true[free]).statistic)
    return {
        "spearman": rho,
        "mean_argmax_top": bool(top[free][np.argmax(mu[free])]),
        "logei_argmax_top": bool(top[free][np.argmax(a_ei)]),
        "lognei_argmax_top": bool(top[free][np.argmax(a_nei)]),
        "top_in_mean_topk": int(top[free][np.argsort(-mu[free])[:k]].sum()),
        "lengthscales": [round(float(v), 3) for v in ls],
        "noise": noise,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=Path, default=Path("../shared/peers"))
    ap.add_argument("--peer-results", type=Path, required=True, help="results.json with BayBE's recorded order")
    ap.add_argument("--strategy", default="baybe", help="whose trajectories to fit on")
    ap.add_argument("--at", default="5,10,15,20", help="training-set sizes (prefixes of the trajectory)")
    ap.add_argument("--recipes", default="engine,baybe,gamma")
    ap.add_argument("--json", type=Path)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then --data/--target/--goal/--params as peer_bench")
    a = ap.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    pb = _load(a.peers / "peer_bench.py", "peer_bench")
    gp = _load(HERE.parent / "sdl" / "engine" / "models" / "gp.py", "sdl_gp")
    pa = argparse.ArgumentParser()
    pa.add_argument("--data", type=Path, required=True)
    pa.add_argument("--target", required=True)
    pa.add_argument("--goal", default="max")
    pa.add_argument("--params")
    pa.add_argument("--columns")
    pa.add_argument("--top-fraction", type=float, default=0.05)
    o = pa.parse_args(rest)
    df, cfg = pb.load_table(o.data, o.columns.split(",") if o.columns else None)
    params = o.params.split(",") if o.params else [p["name"] for p in cfg["parameters"]]
    pool = pb.Pool(df, params, o.target, o.goal, o.top_fraction)
    res = json.loads(a.peer_results.read_text())
    sign = 1.0 if o.goal == "max" else -1.0
    Xall = torch.as_tensor(pool.X, dtype=torch.float64)
    bounds = torch.stack([Xall.min(0).values, Xall.max(0).values])
    util_true = sign * pool.mean
    recipes = a.recipes.split(",")
    rows = []
    for si, seed in enumerate(res["seed_list"]):
        rng = np.random.default_rng(seed)
        rng.choice(pool.N, size=res["initial"], replace=False)
        rep_pick = np.array([rng.integers(len(r)) for r in pool.reps])
        order = [i for i in res["strategies"][a.strategy]["order"][si] if i >= 0]
        for n in [int(v) for v in a.at.split(",")]:
            idx = np.asarray(order[:n])
            y = sign * np.array([pool.reps[i][rep_pick[i]] for i in idx])
            for rc in recipes:
                if rc in ("engine", "engine-gamma"):  # the engine's LogNormal priors / its Gamma lengthscale prior
                    model = gp.fit_gp(Xall[idx], torch.as_tensor(y), bounds=bounds,
                                      priors="lognormal" if rc == "engine" else "gamma")
                elif rc == "gamma":
                    model = fit_gamma(Xall[idx], torch.as_tensor(y), bounds)
                elif rc == "baybe":
                    model = fit_baybe(pool, idx, y)
                else:
                    raise SystemExit(f"--recipes: unknown {rc!r}")
                r = {"seed": seed, "n": n, "recipe": rc, **analyse(model, Xall, idx, util_true, pool.top)}
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("\nmedian spearman / share of arg-max picks in the top set (mean, qLogEI, qLogNEI) / median noise")
    for n in sorted({r["n"] for r in rows}):
        for rc in recipes:
            sel = [r for r in rows if r["n"] == n and r["recipe"] == rc]
            print(f"n={n:3d} {rc:7s} rho {np.median([r['spearman'] for r in sel]):.3f}  "
                  f"top: mean {np.mean([r['mean_argmax_top'] for r in sel]):.2f} "
                  f"logei {np.mean([r['logei_argmax_top'] for r in sel]):.2f} "
                  f"lognei {np.mean([r['lognei_argmax_top'] for r in sel]):.2f}  "
                  f"top-in-top{int(pool.top.sum())} {np.mean([r['top_in_mean_topk'] for r in sel]):.2f}  "
                  f"noise {np.median([r['noise'] for r in sel]):.4f}  "
                  f"ls {np.round(np.median([r['lengthscales'] for r in sel], axis=0), 2).tolist()}")
    if a.json:
        a.json.write_text(json.dumps({"data": str(o.data), "peer_results": str(a.peer_results), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
