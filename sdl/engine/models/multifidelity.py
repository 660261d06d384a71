"""A multi-task GP over fidelities: the measured property (task 0) beside cheap computed sources.

Why a multi-task GP (BoTorch ``MultiTaskGP``, an ICM kernel ``k(x, x') * B[s, s']``) and not the
``SingleTaskMultiFidelityGP``: our cheap sources are other codes and models (OQMD's PBE beside CMR's
RPBE, a pretrained network's zero-shot energy), not one calculation at a coarser setting that converges
to the target as a fidelity parameter goes to 1. The ICM learns from the data how strongly each
source co-varies with the measured property (``B``, kept non-negative by ``PositiveIndexKernel``), so an
uninformative source ends up ignored instead of trusted. Each task is standardised on its own values
(the sources come in other units: eV/atom beside eV/cell), and the measured task's posterior is
returned in its raw units.

Speed: every round adds data; the kernel hyperparameters are re-optimised only when the data grew
by ``refit_growth`` (or the measured task by ``refit_every_measured`` values) since the last
optimisation, otherwise the new data are conditioned on with the last hyperparameters (a Cholesky,
no optimiser): with hundreds of computed values and one new one per round that is most rounds.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

__all__ = ["MultiFidelityGP"]

logger = logging.getLogger(__name__)


class MultiFidelityGP:
    """Fit and query a ``MultiTaskGP`` whose task 0 is the measured property.

    Args:
        bounds: ``2 x d`` bounds of the features (whole pool), for ``Normalize``.
        n_tasks: 1 + the number of computed sources.
        maxiter: L-BFGS iterations per hyperparameter optimisation.
        refit_growth: Re-optimise the hyperparameters once the data grew by this factor.
        refit_every_measured: ... or once this many new measured values arrived.
    """

    def __init__(
        self, bounds: torch.Tensor, n_tasks: int, *, maxiter: int = 100, refit_growth: float = 1.25,
        refit_every_measured: int = 5,
    ) -> None:
        if n_tasks < 2:
            raise ValueError(f"MultiFidelityGP: needs the measured task and at least one source, got {n_tasks=}")
        self.bounds = bounds.to(torch.float64).clone()
        flat = (self.bounds[1] - self.bounds[0]) <= 0
        self.bounds[1, flat] = self.bounds[0, flat] + 1.0
        self.n_tasks = int(n_tasks)
        self.maxiter = int(maxiter)
        self.refit_growth = float(refit_growth)
        self.refit_every_measured = int(refit_every_measured)
        self.model: Any = None
        self.mean = torch.zeros(self.n_tasks, dtype=torch.float64)
        self.std = torch.ones(self.n_tasks, dtype=torch.float64)
        self.n_optimisations = 0
        self._state: dict[str, torch.Tensor] | None = None
        self._n_at_opt = (0, 0)  # (all values, measured values) at the last optimisation

    def __repr__(self) -> str:
        return f"MultiFidelityGP(n_tasks={self.n_tasks}, optimisations={self.n_optimisations})"

    @property
    def d(self) -> int:
        """Number of features (without the task column)."""
        return int(self.bounds.shape[-1])

    def fit(self, X: torch.Tensor, task: torch.Tensor, y: torch.Tensor) -> None:
        """Condition on ``n`` values: features ``X`` (``n x d``), task index ``task`` (``n``), raw ``y`` (``n``).

        Raises:
            ValueError: Fewer than 2 measured values, shapes that disagree, or a task out of range.
        """
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import MultiTaskGP
        from botorch.models.transforms import Normalize
        from gpytorch.mlls import ExactMarginalLogLikelihood

        X = X.to(torch.float64)
        task = task.to(torch.long).reshape(-1)
        y = y.to(torch.float64).reshape(-1)
        if not X.shape[0] == task.shape[0] == y.shape[0]:
            raise ValueError(f"MultiFidelityGP.fit: {X.shape[0]=}, {task.shape[0]=}, {y.shape[0]=} disagree")
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= self.n_tasks):
            raise ValueError(f"MultiFidelityGP.fit: task indices must lie in [0, {self.n_tasks})")
        n_measured = int((task == 0).sum())
        if n_measured < 2:
            raise ValueError(f"MultiFidelityGP.fit: need 2 measured values, have {n_measured}")
        for t in range(self.n_tasks):
            vals = y[task == t]
            self.mean[t] = vals.mean() if vals.numel() else 0.0
            sd = vals.std() if vals.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
            self.std[t] = sd if float(sd) > 1e-9 else 1.0
        Y = ((y - self.mean[task]) / self.std[task]).unsqueeze(-1)
        train_X = torch.cat([X, task.to(torch.float64).unsqueeze(-1)], dim=-1)
        model = MultiTaskGP(
            train_X, Y, task_feature=self.d, output_tasks=[0], all_tasks=list(range(self.n_tasks)),
            outcome_transform=None,
            input_transform=Normalize(d=self.d + 1, indices=list(range(self.d)), bounds=self._bounds_with_task()),
        )
        n_all = int(y.numel())
        grown = n_all >= self.refit_growth * max(self._n_at_opt[0], 1)
        new_measured = n_measured - self._n_at_opt[1] >= self.refit_every_measured
        if self._state is not None and not grown and not new_measured:
            model.load_state_dict(self._state, strict=False)
        else:
            mll = ExactMarginalLogLikelihood(model.likelihood, model)
            if self._state is not None:
                model.load_state_dict(self._state, strict=False)  # warm start: fewer iterations
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": self.maxiter}})
                except Exception as exc:  # noqa: BLE001 - keep the last (or initial) hyperparameters, loudly
                    logger.warning("multi-task GP fit failed (%s); keeping the previous hyperparameters", exc)
            self.n_optimisations += 1
            self._n_at_opt = (n_all, n_measured)
        model.eval()
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()
                       if not k.startswith(("train_", "input_transform"))}
        self.model = model

    def _bounds_with_task(self) -> torch.Tensor:
        # Normalize reads only the feature columns (indices); the task column's bounds are placeholders.
        extra = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        return torch.cat([self.bounds, extra], dim=-1)

    def _require(self) -> Any:
        if self.model is None:
            raise ValueError("MultiFidelityGP: not fitted yet")
        return self.model

    def task_correlation(self) -> torch.Tensor:
        """``T x T`` correlation of the tasks learnt by the ICM kernel (``B`` normalised)."""
        model = self._require()
        with torch.no_grad():
            task_kernel = model.covar_module.kernels[1]
            B = task_kernel.covar_matrix.to_dense()
        d = B.diagonal().clamp_min(1e-12).sqrt()
        corr: torch.Tensor = B / d.unsqueeze(0) / d.unsqueeze(1)
        return corr

    def predict_target(self, X: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the measured property (raw units) at features ``X`` (``n x d``)."""
        from sdl.engine.models.gp import predict_gp

        mean, std = predict_gp(self._require(), X, chunk=chunk)
        return mean * self.std[0] + self.mean[0], std * self.std[0]

    def variance_reduction(self, X: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """``n x T``: how much one new value of task ``t`` at ``x`` shrinks the measured task's variance at ``x``.

        ``Cov(f_0(x), f_t(x))^2 / (Var f_t(x) + noise_t)`` under the current posterior (standardised
        units of the measured task), the one-step information a value of source ``t`` brings about
        the property that counts; ``t = 0`` is a measurement itself.
        """
        model = self._require()
        noise = model.likelihood.noise.detach().reshape(-1)
        if noise.numel() == 1:
            noise = noise.expand(self.n_tasks)
        out = []
        with torch.no_grad():
            for part in torch.split(X.to(torch.float64), chunk):
                m = part.shape[0]
                cols = []
                for t in range(self.n_tasks):
                    tasks = torch.tensor([0.0, float(t)], dtype=torch.float64).expand(m, 2).unsqueeze(-1)
                    pair = torch.cat([part.unsqueeze(1).expand(m, 2, self.d), tasks], dim=-1)
                    cov = model.posterior(pair).mvn.covariance_matrix  # m x 2 x 2
                    c0t, vt = cov[:, 0, 1], cov[:, 1, 1]
                    cols.append(c0t.pow(2) / (vt + noise[t]).clamp_min(1e-12))
                out.append(torch.stack(cols, dim=-1))
        if not out:
            return torch.empty(0, self.n_tasks, dtype=torch.float64)
        return torch.cat(out)
