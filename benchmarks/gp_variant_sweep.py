"""Quick sweep of GP recipe variants on a recorded table, same protocol as ``sdl benchmark``.

Why a separate loop and not the engine: to try a variant (a prior, a warping, an acquisition)
without adding it to the engine first. Same pool, replicate draws and initial rows as ``sdl
benchmark`` (``BenchmarkDataset.measure``; the engine's random design order), q = 1, refit every
step; acquisitions are analytic on the pool (``ei``: EI with the best posterior mean at the measured
rows as incumbent, ``inc: y`` for the best measured value; ``nei``: BoTorch qLogNEI; ``ucb``; ``ts``:
one Thompson draw). Prints experiments to half of the top 5 % per seed.

    python benchmarks/gp_variant_sweep.py --data ../shared/data/olympus/dataset_colors_n9/data.csv \\
        --columns red,green,blue,difference_to_green --target difference_to_green --goal min \\
        --params red,green,blue --variant '{"acq": "ei"}' --seeds 0,1,2,3,4,5,6,7,8,9 --budget 30 --json OUT.json

Variant keys: ``acq`` (ei, nei, ucb, ts), ``inc`` (mean, y), ``beta`` (ucb), ``noise`` (gamma =
Gamma(1.1, 0.05); baybe = BayBE 0.15's Gamma(2, e^5) at its mode), ``ls`` (baybe = BayBE's
dimension-scaled Gamma(3, .) lengthscale prior), ``warp`` (Kumaraswamy input warping), ``y``
(yj = Yeo-Johnson outcome), ``mean`` (linear), ``kern`` (pairs = additive pairwise Matérns).
Without a key the engine's recipe: Matérn-5/2 ARD, BoTorch's dimension-scaled LogNormal priors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings
from typing import Any

import numpy as np
import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms import Standardize
from botorch.models.transforms.input import Warp
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from gpytorch.constraints import GreaterThan
from gpytorch.kernels import AdditiveKernel, Kernel, MaternKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.means import LinearMean
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.priors import GammaPrior, LogNormalPrior

from sdl.benchmark import BenchmarkDataset, load_table_dataset

Variant = dict[str, Any]


def transform_y(y: np.ndarray, kind: str) -> np.ndarray:
    """The outcome the GP learns: raw, or Yeo-Johnson (refit on every step's data)."""
    if kind == "none":
        return y
    from sklearn.preprocessing import PowerTransformer

    out: np.ndarray = PowerTransformer(method="yeo-johnson").fit_transform(y.reshape(-1, 1)).ravel()
    return out


def _kernel(v: Variant, d: int) -> Kernel:
    def ls_prior(k: int) -> LogNormalPrior:  # BoTorch's dimension-scaled prior (Hvarfner et al. 2024)
        return LogNormalPrior(loc=math.sqrt(2) + 0.5 * math.log(k), scale=math.sqrt(3))

    if v.get("ls") == "baybe":
        pr = GammaPrior(3.0, 2.0 / math.exp(math.sqrt(2) - 3) / math.sqrt(d))
        return MaternKernel(nu=2.5, ard_num_dims=d, lengthscale_prior=pr,
                            lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=pr.mode))
    if v.get("kern") == "pairs":
        return AdditiveKernel(*[ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=2, active_dims=list(p),
                                                         lengthscale_prior=ls_prior(2)))
                                for p in itertools.combinations(range(d), 2)])
    kern: Kernel = get_covar_module_with_dim_scaled_prior(ard_num_dims=d)
    return kern


def fit(X: np.ndarray, y: np.ndarray, v: Variant) -> SingleTaskGP:
    """A SingleTaskGP on unit-cube inputs with the variant's priors, warping and mean."""
    d = X.shape[1]
    lik = None
    if v.get("noise") == "gamma":
        lik = GaussianLikelihood(noise_prior=GammaPrior(1.1, 0.05), noise_constraint=GreaterThan(1e-4))
    elif v.get("noise") == "baybe":
        pr = GammaPrior(2.0, 1.0 / math.exp(-5.0))
        lik = GaussianLikelihood(noise_prior=pr, noise_constraint=GreaterThan(1e-4, transform=None,
                                                                             initial_value=pr.mode))
    warp = None
    if v.get("warp"):
        c = LogNormalPrior(0.0, 0.75 ** 0.5)
        warp = Warp(d=d, indices=list(range(d)), concentration1_prior=c, concentration0_prior=c,
                    bounds=torch.tensor([[0.0] * d, [1.0] * d], dtype=torch.float64))
    mean = LinearMean(input_size=d) if v.get("mean") == "linear" else None
    model = SingleTaskGP(torch.as_tensor(X), torch.as_tensor(y).reshape(-1, 1), likelihood=lik, mean_module=mean,
                         covar_module=_kernel(v, d), input_transform=warp, outcome_transform=Standardize(m=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model),
                         optimizer_kwargs={"options": {"maxiter": 150}})
    model.eval()
    return model


def choose(model: SingleTaskGP, Xc: np.ndarray, Xtr: np.ndarray, ytr: np.ndarray, v: Variant, step: int) -> int:
    """Index into ``Xc`` of the next experiment (utility = higher is better)."""
    acq = v.get("acq", "ei")
    Xct = torch.as_tensor(Xc)
    if acq == "nei":
        from botorch.acquisition import qLogNoisyExpectedImprovement
        from botorch.sampling.normal import SobolQMCNormalSampler

        f = qLogNoisyExpectedImprovement(model, X_baseline=torch.as_tensor(Xtr), prune_baseline=True,
                                         sampler=SobolQMCNormalSampler(torch.Size([128]), seed=step))
        with torch.no_grad():
            return int(torch.cat([f(c.unsqueeze(1)) for c in torch.split(Xct, 256)]).argmax())
    with torch.no_grad():
        post = model.posterior(Xct)
        mu, sd = post.mean.reshape(-1), post.variance.clamp_min(1e-12).sqrt().reshape(-1)
        if acq == "ts":
            return int(post.rsample(torch.Size([1])).reshape(-1).argmax())
        if acq == "ucb":
            return int((mu + math.sqrt(float(v.get("beta", 2.0))) * sd).argmax())
        best = float(ytr.max()) if v.get("inc") == "y" else float(model.posterior(torch.as_tensor(Xtr)).mean.max())
        from botorch.acquisition.analytic import _log_ei_helper

        return int((_log_ei_helper((mu - best) / sd) + sd.log()).argmax())


def replay(ds: BenchmarkDataset, v: Variant, seed: int, budget: int, initial: int = 2) -> int | None:
    """Experiments to half of the top 5 % (None: not within ``budget``)."""
    sign = 1.0 if ds.goal == "max" else -1.0
    X = ds.candidate_pool().parameter_matrix().numpy().astype(float)
    lo, hi = X.min(0), X.max(0)
    Xs = (X - lo) / np.where(hi > lo, hi - lo, 1.0)
    n = ds.pool_size
    m = math.ceil(0.05 * n)
    top = set(np.argsort(-sign * ds.truth, kind="stable")[:m].tolist())
    order = [int(i) for i in np.random.default_rng([seed, 0xD5]).permutation(n)[:initial]]  # the engine's design
    ys = [sign * ds.measure(i, seed) for i in order]
    while len(order) < budget:
        free = np.setdiff1d(np.arange(n), order)
        yt = transform_y(np.asarray(ys), str(v.get("y", "none")))
        i = int(free[choose(fit(Xs[order], yt, v), Xs[free], Xs[order], yt, v, len(order))])
        order.append(i)
        ys.append(sign * ds.measure(i, seed))
        if sum(int(o in top) for o in order) >= math.ceil(m / 2):
            return len(order)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--goal", required=True, choices=["max", "min"])
    ap.add_argument("--params", required=True, help="comma list")
    ap.add_argument("--columns", help="comma list for a header-less CSV")
    ap.add_argument("--variant", action="append", required=True, help="JSON object; repeat for several")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--json", help="write {variant: per-seed results} here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_table_dataset(a.data, a.target, a.goal, a.params.split(","),
                            columns=a.columns.split(",") if a.columns else None)
    out: dict[str, list[int | None]] = {}
    for spec in a.variant:
        t0 = time.time()
        res = [replay(ds, json.loads(spec), int(s), a.budget) for s in a.seeds.split(",")]
        out[spec] = res
        med = float(np.median([np.inf if r is None else r for r in res]))
        print(f"{spec}: median {med} per seed {res} ({time.time() - t0:.0f} s)", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"data": a.data, "budget": a.budget, "seeds": a.seeds, "results": out}, fh, indent=1)


if __name__ == "__main__":
    main()
