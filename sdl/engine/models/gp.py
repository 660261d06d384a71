"""GP baseline: a ``SingleTaskGP`` (Matérn-5/2 or RBF, ARD) with input normalisation and outcome standardisation.

Why one GP for every case: continuous, integer and categorical recipes arrive one-hot/unit-cube
encoded by :class:`sdl.engine.space.ParameterSpace`, and crystal pools arrive as composition descriptors
(:mod:`sdl.engine.models.composition`); on such inputs a Matérn-5/2 ARD GP is the standard baseline
(Liang et al. 2021 benchmark this exact setting on the crossed-barrel data). Inputs are normalised
with bounds taken from the *whole* candidate set when known, so pool rows never fall outside.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gpytorch.kernels import Kernel

__all__ = ["PRIORS", "GPPredictor", "JointPosterior", "fit_gp", "gamma_prior_modules", "predict_gp"]

logger = logging.getLogger(__name__)

PRIORS = ("gamma", "lognormal")


def gamma_prior_modules(d: int, kernel: str = "matern52") -> tuple[Any, Any]:
    """ARD kernel with BayBE 0.15's dimension-scaled Gamma lengthscale prior; BoTorch's LogNormal noise likelihood.

    Why Gamma and not BoTorch's LogNormal lengthscale prior (Hvarfner et al. 2024): both put the
    mode at ``exp(sqrt(2) - 3) * sqrt(d)`` on the unit cube, but the LogNormal's heavy right tail
    lets a few dozen points push lengthscales long, and the model then ranks the unmeasured pool
    worse (benchmarks/surrogate_diagnosis.py: Spearman 0.72 vs 0.76 on AutoAM after 20
    experiments). BayBE's Gamma(2, e^5) noise prior is left out: the fitted noise sat at the common
    mode either way and the closed-loop runs with and without it were alike. The price of the
    light tail: no column can be switched off by a long lengthscale, and on 30 composition
    descriptors the LogNormal fits better (tests/test_gp.py). Opt-in (``model.options.priors:
    gamma``): ahead on AutoAM, behind on AgNP and the crossed barrel (README, peer tables).
    """
    from botorch.models.utils.gpytorch_modules import get_gaussian_likelihood_with_lognormal_prior
    from gpytorch.constraints import GreaterThan
    from gpytorch.kernels import MaternKernel, RBFKernel
    from gpytorch.priors import GammaPrior

    ls_prior = GammaPrior(3.0, 2.0 / (math.exp(math.sqrt(2.0) - 3.0) * math.sqrt(d)))
    ls_constraint = GreaterThan(2.5e-2, transform=None, initial_value=ls_prior.mode)
    if kernel == "rbf":
        covar: Any = RBFKernel(ard_num_dims=d, lengthscale_prior=ls_prior, lengthscale_constraint=ls_constraint)
    else:
        covar = MaternKernel(nu=2.5, ard_num_dims=d, lengthscale_prior=ls_prior, lengthscale_constraint=ls_constraint)
    return covar, get_gaussian_likelihood_with_lognormal_prior()


def fit_gp(
    X: torch.Tensor,
    y: torch.Tensor,
    bounds: torch.Tensor | None = None,
    maxiter: int = 150,
    kernel: str = "matern52",
    priors: str = "lognormal",
) -> Any:
    """Fit a GP to ``X`` (``n x d``) and ``y`` (``n``) by maximising the marginal likelihood.

    Args:
        X: Training inputs, float64.
        y: Raw targets (the model learns the property, not the utility).
        bounds: ``2 x d`` bounds for ``Normalize``; the range of ``X`` when None.
        maxiter: L-BFGS iterations for the hyperparameters; 30 ARD lengthscales on a few dozen
            points otherwise take several hundred iterations for a negligible gain.
        kernel: ``matern52`` or ``rbf``, ARD.
        priors: ``lognormal`` (BoTorch's dimension-scaled LogNormal lengthscale and noise priors:
            heavy tails switch off irrelevant columns, right for descriptor features) or ``gamma``
            (:func:`gamma_prior_modules`, right for a few recipe parameters that all matter).

    Returns:
        A fitted ``botorch.models.SingleTaskGP`` in eval mode.
    """
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
    from gpytorch.mlls import ExactMarginalLogLikelihood

    X = X.to(torch.float64)
    Y = y.to(torch.float64).reshape(-1, 1)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"fit_gp: {X.shape[0]=} inputs but {Y.shape[0]=} targets")
    if X.shape[0] < 2:
        raise ValueError(f"fit_gp: need at least 2 observations, got {X.shape[0]}")
    bounds = torch.stack([X.min(dim=0).values, X.max(dim=0).values]) if bounds is None else bounds.to(X).clone()
    flat = (bounds[1] - bounds[0]) <= 0  # constant descriptor columns: any non-zero range will do
    bounds[1, flat] = bounds[0, flat] + 1.0
    if kernel not in ("matern52", "rbf"):
        raise ValueError(f"fit_gp: kernel must be 'matern52' or 'rbf', got {kernel!r}")
    if priors not in PRIORS:
        raise ValueError(f"fit_gp: priors must be one of {PRIORS}, got {priors!r}")
    if priors == "gamma":
        covar, likelihood = gamma_prior_modules(X.shape[-1], kernel)
    else:
        covar, likelihood = get_covar_module_with_dim_scaled_prior(
            ard_num_dims=X.shape[-1], use_rbf_kernel=kernel == "rbf"), None  # SingleTaskGP's LogNormal noise prior
    model = SingleTaskGP(
        X, Y, covar_module=covar, likelihood=likelihood, input_transform=Normalize(d=X.shape[-1], bounds=bounds),
        outcome_transform=Standardize(m=1),
    )
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimiser chatter on tiny data sets; failures still raise below
        try:
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": int(maxiter)}})
        except Exception as exc:  # noqa: BLE001 - fall back to the prior hyperparameters, loudly
            logger.warning("GP marginal-likelihood fit failed (%s); using initial hyperparameters", exc)
    model.eval()
    return model


def predict_gp(model: Any, X: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (of the latent function) at ``X``, in chunks; each ``[N]`` float64.

    ``chunk`` stays small on purpose: a posterior over n points is a joint one whose cost grows
    like n^2 (measured: 16k points in 0.4 s with chunks of 512, 7 s with chunks of 4096).
    """
    means, stds = [], []
    with torch.no_grad():
        for part in torch.split(X.to(torch.float64), chunk):
            post = model.posterior(part)
            means.append(post.mean.reshape(-1))
            stds.append(post.variance.clamp_min(0.0).sqrt().reshape(-1))
    if not means:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    return torch.cat(means), torch.cat(stds)


class GPPredictor:
    """Posterior mean and std of a fitted ``SingleTaskGP`` from one cached Cholesky factor.

    Why not ``model.posterior`` for a big pool: each call builds a joint posterior (lazy tensors,
    a solve against the training covariance, checks) for its chunk; with the training covariance
    factorised once, a chunk of ``c`` candidates costs one ``c x n`` cross-covariance, one
    triangular solve and two reductions, in memory bounded by the chunk. The object is small
    (the training inputs, ``L``, ``alpha`` and the kernel module) and picklable, so Dask workers
    score pool chunks with it too. Same numbers as :func:`predict_gp` up to float rounding.

    Args:
        model: A fitted ``SingleTaskGP`` in eval mode, or a
            :class:`sdl.engine.models.extensive.RowScaledModel` around one (then the last input
            column is the per-row scale, applied to mean and std).
    """

    def __init__(self, model: Any) -> None:
        from botorch.models import SingleTaskGP

        from sdl.engine.models.extensive import RowScaledModel

        self.row_scaled = isinstance(model, RowScaledModel)
        gp = model.base if self.row_scaled else model
        if not isinstance(gp, SingleTaskGP) or gp.num_outputs != 1:
            raise TypeError(f"GPPredictor needs a single-output SingleTaskGP, got {type(gp).__name__} "
                            f"with {getattr(gp, 'num_outputs', '?')} outputs")
        with torch.no_grad():
            X = gp.train_inputs[0]  # already through the input transform (eval mode)
            t = gp.train_targets
            self.covar = gp.covar_module
            self.mean_module = gp.mean_module
            self.input_transform = getattr(gp, "input_transform", None)
            K = self.covar(X).to_dense() + torch.diag(gp.likelihood.noise.reshape(-1).expand(X.shape[0]))
            self.L = torch.linalg.cholesky(K + 1e-10 * torch.eye(K.shape[0], dtype=K.dtype))
            self.alpha = torch.cholesky_solve((t - self.mean_module(X)).unsqueeze(-1), self.L).squeeze(-1)
            self.X_train = X
        tf = getattr(gp, "outcome_transform", None)
        if tf is not None and hasattr(tf, "stdvs"):
            self.y_scale, self.y_shift = float(tf.stdvs.reshape(-1)[0]), float(tf.means.reshape(-1)[0])
        else:
            self.y_scale, self.y_shift = 1.0, 0.0

    def __repr__(self) -> str:
        return f"GPPredictor(n_train={self.X_train.shape[0]}, row_scaled={self.row_scaled})"

    def _inputs(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model-space inputs (input transform applied) and the per-row scale (None unless row-scaled)."""
        X = X.to(torch.float64)
        scale = X[:, -1] if self.row_scaled else None
        Z = X[:, :-1] if self.row_scaled else X
        if self.input_transform is not None:
            Z = self.input_transform(Z)
        return Z, scale

    def __call__(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the latent function (raw units) at ``X`` (``c x d``, acquisition inputs), each ``[c]``."""
        with torch.no_grad():
            Z, scale = self._inputs(X)
            Ks = self.covar(Z, self.X_train).to_dense()  # c x n
            mean = self.mean_module(Z) + Ks @ self.alpha
            V = torch.linalg.solve_triangular(self.L, Ks.T, upper=False)  # n x c
            prior_var = self.covar(Z, diag=True)
            var = (prior_var - (V * V).sum(dim=0)).clamp_min(0.0)
            mean = mean * self.y_scale + self.y_shift
            std = var.sqrt() * self.y_scale
            if scale is not None:
                mean, std = mean * scale, std * scale
        return mean, std

    def joint(self, X: torch.Tensor) -> JointPosterior:
        """The joint posterior of the latent function (raw units) over the rows of ``X`` (``c x d``).

        Why: a proposal evaluates its acquisition many times over one finite set (shortlist,
        pending, baseline); mean and variance of every row, and the covariance columns the
        acquisition asks for, are all it needs
        (:class:`sdl.engine.models.candidate_set.CandidateSetGP`). Costs one ``c x n`` cross-covariance
        and solve here, then ``c`` kernel values per covariance column.
        """
        with torch.no_grad():
            Z, scale = self._inputs(X)
            Ks = self.covar(Z, self.X_train).to_dense()  # c x n
            mean = (self.mean_module(Z) + Ks @ self.alpha) * self.y_scale + self.y_shift
            V = torch.linalg.solve_triangular(self.L, Ks.T, upper=False)  # n x c
            var = (self.covar(Z, diag=True) - (V * V).sum(dim=0)) * self.y_scale**2
            s = torch.ones_like(mean) if scale is None else scale
        return JointPosterior(mean * s, var * s * s, Z, V, s, self.covar, self.y_scale)


@dataclass(frozen=True)
class JointPosterior:
    """A GP's joint posterior over ``c`` fixed rows: mean, variance, and covariance columns on demand.

    Why columns and not the ``c x c`` matrix: a greedy pick needs the covariance of every row with
    the few pending, baseline and chosen rows only; ``c`` kernel values per column instead of
    ``c^2`` for the whole matrix.

    Attributes:
        mean: ``[c]`` posterior mean (raw units, row-scaled).
        var: ``[c]`` posterior variance.
        Z: ``c x d`` model-space inputs.
        V: ``n x c`` ``L^-1 K(train, rows)``.
        scale: ``[c]`` per-row scale (ones unless row-scaled).
        covar: The GP's kernel module.
        y_scale: Outcome standardisation scale.
    """

    mean: torch.Tensor
    var: torch.Tensor
    Z: torch.Tensor
    V: torch.Tensor
    scale: torch.Tensor
    covar: Kernel
    y_scale: float

    def columns(self, rows: torch.Tensor) -> torch.Tensor:
        """``c x k`` posterior covariance of every row with the rows ``rows`` (``[k]`` long)."""
        with torch.no_grad():
            K = self.covar(self.Z, self.Z[rows]).to_dense() - self.V.T @ self.V[:, rows]
            out: torch.Tensor = K * (self.y_scale**2) * self.scale.unsqueeze(-1) * self.scale[rows].unsqueeze(-2)
        return out
