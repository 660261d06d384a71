"""Warm start: measurements of earlier campaigns as *related tasks* of a multi-task GP.

Why a multi-task GP and not just more rows: an earlier campaign measured the same property, but
perhaps on another batch of feedstock, another instrument, another week; its values are evidence,
not experiments of this campaign. BoTorch's ``MultiTaskGP`` (intrinsic coregionalisation: a data
kernel times a learned task covariance, a constant mean per task) learns how far the earlier
campaigns' values carry over, so a source that agrees seeds the model strongly and one that does
not is discounted, while this campaign's own values always speak for themselves.

Task ``0`` is this campaign (the only output task: every prediction, acquisition value and metric
is of this campaign); tasks ``1..T`` are the source campaigns, one each. Outcomes are standardised
over all tasks together, not per task: the sources are validated to measure the same property in
the same unit (``transfer:``), so one scale is right, and a per-task scale estimated from the two
points of an initial design would be noise.

The related data never enters the engine's observations: budget, design quota, best so far,
stopping rules and ``sdl status`` see only the campaign's own experiments.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from sdl.engine.models.pretrained import HeldOut

if TYPE_CHECKING:
    from botorch.models import MultiTaskGP

    from sdl.engine.models.surrogate import Surrogate
    from sdl.engine.space import CandidatePool, ParameterSpace

__all__ = ["RelatedData", "encode_loose", "fit_multitask_gp", "fit_with_related", "multitask_leave_one_out",
           "leave_one_out", "place_related", "related_row"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelatedData:
    """Measurements of related tasks (earlier campaigns) that seed the model of this one.

    Attributes:
        keys: Candidate key of each measurement in its own campaign.
        params: Its recipe (parameter values; ``formula`` when known).
        values: Its raw value (mean of the experiment's ok measurements), in the objective's unit.
        tasks: Task index of each measurement, ``1..T`` (``0`` is this campaign, never here).
        task_names: Name of task ``t`` at position ``t - 1`` (the source campaign's name).
    """

    keys: tuple[str, ...]
    params: tuple[Mapping[str, Any], ...]
    values: tuple[float, ...]
    tasks: tuple[int, ...]
    task_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.keys)
        if not (len(self.params) == len(self.values) == len(self.tasks) == n):
            raise ValueError(f"RelatedData: {n} keys, {len(self.params)} params, {len(self.values)} values, "
                             f"{len(self.tasks)} tasks")
        bad = [t for t in self.tasks if not 1 <= t <= len(self.task_names)]
        if bad:
            raise ValueError(f"RelatedData: task index {bad[0]} outside 1..{len(self.task_names)}")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, str, Mapping[str, Any], float]]) -> RelatedData:
        """From ``(source name, key, params, value)`` rows; one task per source, in first-seen order."""
        names: list[str] = []
        for name, *_ in rows:
            if name not in names:
                names.append(name)
        return cls(
            keys=tuple(str(r[1]) for r in rows), params=tuple(dict(r[2]) for r in rows),
            values=tuple(float(r[3]) for r in rows), tasks=tuple(names.index(r[0]) + 1 for r in rows),
            task_names=tuple(names),
        )

    def digest_parts(self) -> list[tuple[str, int, float]]:
        """What identifies the data in a model version: (key, task, value) per measurement."""
        return [(k, t, round(float(v), 12)) for k, t, v in zip(self.keys, self.tasks, self.values, strict=True)]


def encode_loose(space: ParameterSpace, params: Mapping[str, Any]) -> torch.Tensor | None:
    """``[d]`` encoding of a recipe like ``ParameterSpace.encode``, but values beyond the bounds extrapolate.

    A source campaign may have searched a wider (or shifted) box than this one: its points outside
    still inform a GP (they are just outside ``[0, 1]``), while ``encode`` would refuse them. None
    when a parameter is missing or a categorical value is not one of this space's choices.
    """
    x = torch.zeros(space.dim, dtype=torch.float64)
    for p, sl in zip(space.parameters, space.slices, strict=True):
        if p.name not in params:
            return None
        v = params[p.name]
        if p.type == "categorical":
            names = [str(c) for c in p.options]
            if str(v) not in names:
                return None
            x[sl.start + names.index(str(v))] = 1.0
            continue
        try:
            fv = float(v)
        except (TypeError, ValueError):
            return None
        if not np.isfinite(fv):
            return None
        low, high = p.span
        x[sl.start] = (fv - low) / (high - low)
    return x


def related_row(pool: CandidatePool, key: str, params: Mapping[str, Any]) -> int | None:
    """The pool row a source measurement is of, or None.

    A parameter pool matches by recipe only: ids are per file, so another campaign's ``d00012``
    may be a different design here. Other pools (crystals) match by key, and only when a formula
    the source recorded agrees with the row's.
    """
    if pool.parameter_columns:
        match = pool.key_for_params(params)
        return pool.index_of(match) if match is not None else None
    if key not in pool:
        return None
    row = pool.index_of(key)
    formula = params.get("formula")
    if formula and pool.formula_column is not None:
        from pymatgen.core import Composition

        try:
            same = Composition(str(formula)).reduced_formula == Composition(pool.formulas([row])[0]).reduced_formula
        except (ValueError, KeyError):
            same = False
        if not same:
            return None
    return row


def place_related(
    surrogate: Surrogate, related: RelatedData, X_all: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, values and tasks of the related measurements in ``surrogate``'s input encoding.

    Where a measurement goes: the pool candidate it is of (:func:`related_row`) takes that row of
    ``X_all`` (and its cell scale, for extensive targets); otherwise a GP on parameter columns or on
    a space encodes the recipe itself (:func:`encode_loose`), and a GP on composition descriptors
    the formula. What cannot be placed (a crystal no backbone embedded here) is left out, logged.

    Args:
        surrogate: The model being fitted (its pool or space says how to encode).
        related: The source measurements.
        X_all: ``[N, d]`` per-row model features in pool mode (None in space mode).

    Returns:
        ``X`` ``[m, d]``, ``y`` ``[m]`` (per-row scaled when extensive), ``tasks`` ``[m]``.
    """
    from sdl.engine.models.surrogate import GPSurrogate

    pool, space = surrogate.pool, surrogate.space
    rows: list[torch.Tensor] = []
    ys: list[float] = []
    tasks: list[int] = []
    by_recipe = isinstance(surrogate, GPSurrogate) and not surrogate.extensive
    params_space = pool.space if pool is not None and pool.parameter_columns and isinstance(surrogate, GPSurrogate) \
        and surrogate.descriptors != "composition" else None
    for key, params, value, task in zip(related.keys, related.params, related.values, related.tasks, strict=True):
        x: torch.Tensor | None = None
        scale = 1.0
        if pool is not None:
            assert X_all is not None
            row = related_row(pool, key, params)
            if row is not None and pool.keys[row] not in surrogate.excluded:
                x, scale = X_all[row], float(surrogate.row_scale()[row])
            elif by_recipe and params_space is not None:
                x = encode_loose(params_space, params)
            elif by_recipe and params.get("formula"):
                from sdl.engine.models.composition import composition_features

                try:
                    x = torch.as_tensor(composition_features([str(params["formula"])])[0], dtype=torch.float64)
                except (ValueError, KeyError):
                    x = None
        elif space is not None:
            x = encode_loose(space, params)
        if x is not None:
            rows.append(x)
            ys.append(float(value) / scale)
            tasks.append(int(task))
    if len(rows) < len(related):
        logger.info("transfer: %d of %d source measurements placed in this campaign's inputs (the rest are "
                    "candidates this model cannot encode)", len(rows), len(related))
    d = X_all.shape[1] if X_all is not None else (space.dim if space is not None else 0)
    X = torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float64)
    return X, torch.tensor(ys, dtype=torch.float64), torch.tensor(tasks, dtype=torch.float64)


def fit_with_related(
    surrogate: Surrogate, X: torch.Tensor, y: torch.Tensor, X_all: torch.Tensor | None, related: RelatedData, *,
    bounds: torch.Tensor, kernel: str, priors: str = "lognormal",
) -> Any:
    """The surrogate's GP on its own ``(X, y)`` and the related data it can place (:func:`place_related`).

    A ``MultiTaskGP`` when any related measurement could be placed, else the plain GP
    (:func:`sdl.engine.models.gp.fit_gp`, with ``priors``) as without ``transfer:``. The multi-task GP
    keeps BoTorch's dimension-scaled priors.
    """
    from sdl.engine.models.gp import fit_gp

    X_rel, y_rel, tasks = place_related(surrogate, related, X_all)
    if not len(y_rel):
        logger.warning("transfer: none of the %d source measurements fits this campaign's inputs; fitting cold",
                       len(related))
        return fit_gp(X, y, bounds=bounds, kernel=kernel, priors=priors)
    return fit_multitask_gp(X, y, X_rel, y_rel, tasks, bounds=bounds, kernel=kernel)


def fit_multitask_gp(
    X: torch.Tensor,
    y: torch.Tensor,
    X_related: torch.Tensor,
    y_related: torch.Tensor,
    tasks: torch.Tensor,
    *,
    bounds: torch.Tensor | None = None,
    kernel: str = "matern52",
    maxiter: int = 150,
) -> MultiTaskGP:
    """An ICM ``MultiTaskGP`` over this campaign's ``(X, y)`` (task 0) and related ``(X_related, y_related)``.

    Args:
        X: ``n x d`` inputs of this campaign's observations.
        y: ``n`` raw values.
        X_related: ``m x d`` inputs of the related measurements (same encoding).
        y_related: ``m`` raw values.
        tasks: ``m`` task index (``1..T``) per related measurement.
        bounds: ``2 x d`` bounds of ``Normalize`` (the candidate set's range); the data's when None.
        kernel: ``matern52`` or ``rbf`` data kernel (ARD, BoTorch's dimension-scaled prior).
        maxiter: L-BFGS iterations of the marginal-likelihood fit.

    Returns:
        A fitted model in eval mode whose only output is task 0: ``posterior`` takes ``n x d``
        inputs without a task column, like a ``SingleTaskGP``.

    Raises:
        ValueError: Shapes that disagree, or fewer than 2 observations in all.
    """
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import MultiTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
    from gpytorch.mlls import ExactMarginalLogLikelihood

    X = X.to(torch.float64)
    X_related = X_related.to(torch.float64).reshape(-1, X.shape[-1])
    if X.shape[0] != y.numel() or X_related.shape[0] != y_related.numel() or tasks.numel() != y_related.numel():
        raise ValueError(f"fit_multitask_gp: {X.shape=}, {y.shape=}, {X_related.shape=}, {y_related.shape=}, "
                         f"{tasks.shape=} disagree")
    if X.shape[0] + X_related.shape[0] < 2:
        raise ValueError("fit_multitask_gp: need at least 2 observations in all")
    if kernel not in ("matern52", "rbf"):
        raise ValueError(f"fit_multitask_gp: kernel must be 'matern52' or 'rbf', got {kernel!r}")
    d = X.shape[-1]
    X_all = torch.cat([X, X_related])
    if bounds is None:
        bounds = torch.stack([X_all.min(dim=0).values, X_all.max(dim=0).values])
    bounds = bounds.to(X_all).clone()
    flat = (bounds[1] - bounds[0]) <= 0
    bounds[1, flat] = bounds[0, flat] + 1.0
    task_col = torch.cat([torch.zeros(X.shape[0], dtype=torch.float64), tasks.to(torch.float64).reshape(-1)])
    train_X = torch.cat([X_all, task_col.unsqueeze(-1)], dim=-1)
    train_Y = torch.cat([y.reshape(-1), y_related.reshape(-1)]).to(torch.float64).unsqueeze(-1)
    all_tasks = sorted({0, *(int(t) for t in tasks.reshape(-1).tolist())})
    full_bounds = torch.cat([bounds, torch.tensor([[0.0], [1.0]], dtype=torch.float64)], dim=-1)
    with torch.random.fork_rng(devices=[]):  # the task kernel starts from random factors: seeded, same fit
        torch.manual_seed(0)
        model = MultiTaskGP(
            train_X, train_Y, task_feature=d, output_tasks=[0], all_tasks=all_tasks,
            covar_module=get_covar_module_with_dim_scaled_prior(ard_num_dims=d, use_rbf_kernel=kernel == "rbf",
                                                                active_dims=list(range(d))),
            input_transform=Normalize(d=d + 1, indices=list(range(d)), bounds=full_bounds),
            outcome_transform=Standardize(m=1),
        )
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": int(maxiter)}})
        except Exception as exc:  # noqa: BLE001 - fall back to the prior hyperparameters, loudly
            logger.warning("multi-task GP fit failed (%s); using initial hyperparameters", exc)
    model.eval()
    logger.debug("multi-task GP: %d own + %d related points, %d tasks", X.shape[0], X_related.shape[0],
                 len(all_tasks))
    return model


def multitask_leave_one_out(model: MultiTaskGP, n_own: int) -> HeldOut:
    """Exact leave-one-out predictions of this campaign's ``n_own`` labels (the first training rows).

    The same formula as :func:`sdl.engine.models.pretrained.gp_leave_one_out` on the joint
    (data x task) covariance: each own label is predicted from all the others *and* the related
    data, which is what the model proposes with.
    """
    with torch.no_grad():
        inputs: Any = model.train_inputs  # eval mode: already through the input transform
        Xt: torch.Tensor = inputs[0]
        t = cast(torch.Tensor, model.train_targets)
        prior = type(model).forward(model, Xt)  # the prior over the training rows: mean and covariance
        K = prior.covariance_matrix
        noisy = model.likelihood(prior, Xt).covariance_matrix  # + each row's task noise
        K = K + torch.diag((noisy.diagonal() - K.diagonal()).clamp_min(1e-10))
        m = prior.mean
        L = torch.linalg.cholesky(K + 1e-10 * torch.eye(K.shape[0], dtype=K.dtype))
        Kinv = torch.cholesky_inverse(L)
        dg = torch.diagonal(Kinv)
        alpha = Kinv @ (t - m)
        mu = (t - alpha / dg)[:n_own]
        sd = (1.0 / dg).clamp_min(0.0).sqrt()[:n_own]
        y_raw = t[:n_own]
        tf = getattr(model, "outcome_transform", None)
        if tf is not None and hasattr(tf, "stdvs"):
            scale, shift = tf.stdvs.reshape(-1)[0], tf.means.reshape(-1)[0]
            y_raw, mu, sd = y_raw * scale + shift, mu * scale + shift, sd * scale
    return HeldOut(y=y_raw.numpy(), mean=mu.numpy(), std=sd.numpy(), rows=np.arange(n_own))


def leave_one_out(model: object, n_own: int | None = None) -> HeldOut:
    """Leave-one-out predictions of a fitted GP's own labels, single- or multi-task."""
    from botorch.models import MultiTaskGP

    from sdl.engine.models.pretrained import gp_leave_one_out

    if isinstance(model, MultiTaskGP):
        inputs: Any = model.train_inputs
        n = int((inputs[0][:, -1] == 0).sum()) if n_own is None else int(n_own)
        return multitask_leave_one_out(model, n)
    return gp_leave_one_out(model)
