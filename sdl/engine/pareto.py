"""Several objectives at once: utilities, outcome constraints, the Pareto front and its hypervolume.

Why a utility per objective (as :class:`sdl.engine.objectives.Objective` defines it: ``y`` to maximise,
``-y`` to minimise, minus the distance to a target range): every objective then means "higher is
better", which is what BoTorch's hypervolume machinery and the Pareto front assume, and a target range
becomes a maximised utility whose best value, 0, is every point inside the band.

Columns: raw measurements are a matrix ``n x p`` over :attr:`MultiObjective.properties` (each
objective's property, then each constrained property that is no objective). Outcome constraints act on
raw values (``gap_gllbsc >= 1.5``): a row is feasible when it meets all of them. Only feasible rows
count on the front. The reference point (``reference_point:`` in the YAML, raw units, the worst value
still worth having) becomes a utility point; without one it is inferred from the front
(:func:`botorch.utils.multi_objective.infer_reference_point`: the nadir minus 10 % of the range).

Torch is imported only for the acquisition pieces (:meth:`MultiObjective.mc_objective`,
:meth:`MultiObjective.mc_constraints`) and for hypervolumes of more than two objectives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sdl.engine.objectives import Objective

if TYPE_CHECKING:
    import torch

__all__ = ["Constraint", "MultiObjective", "pareto_mask", "hypervolume"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Constraint:
    """``property op value``, on raw measured values.

    Args:
        property: The constrained property.
        op: ``>=`` or ``<=``.
        value: The bound.
    """

    property: str
    op: Literal[">=", "<="]
    value: float

    def slack(self, y: Any) -> Any:
        """``<= 0`` where met (BoTorch's convention for outcome constraints); works on arrays and tensors."""
        return self.value - y if self.op == ">=" else y - self.value

    def __str__(self) -> str:
        return f"{self.property} {self.op} {self.value:g}"


def pareto_mask(utilities: np.ndarray) -> np.ndarray:
    """``[n]`` True for the rows of ``utilities`` (``n x m``, higher better) that no other row dominates.

    Rows with a NaN are never on the front; equal rows are all kept.
    """
    util = np.asarray(utilities, dtype=np.float64)
    mask = np.zeros(util.shape[0], dtype=bool)
    idx = np.flatnonzero(np.isfinite(util).all(axis=1))
    rows = util[idx]
    for j, i in enumerate(idx):
        point = rows[j]
        dominated = np.all(rows >= point, axis=1) & np.any(rows > point, axis=1)
        mask[i] = not dominated.any()
    return mask


def hypervolume(utilities: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume that the rows of ``utilities`` (``n x m``) dominate above the point ``ref`` (``m``).

    Exact: a sweep for one and two objectives, BoTorch's ``Hypervolume`` beyond. Rows that do not
    strictly dominate ``ref`` add nothing.
    """
    point = np.asarray(ref, dtype=np.float64)
    util = np.asarray(utilities, dtype=np.float64).reshape(-1, len(point))
    U = util[np.isfinite(util).all(axis=1) & np.all(util - point > 0, axis=1)]
    if U.shape[0] == 0:
        return 0.0
    U = U[pareto_mask(U)]
    if U.shape[1] == 1:
        return float(U[:, 0].max() - point[0])
    if U.shape[1] == 2:
        order = np.argsort(-U[:, 0], kind="stable")
        volume, top = 0.0, point[1]
        for x, y in U[order]:
            if y > top:
                volume += (x - point[0]) * (y - top)
                top = y
        return float(volume)
    import torch
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    hv = Hypervolume(ref_point=torch.as_tensor(point))
    return float(hv.compute(torch.as_tensor(U)))


class MultiObjective:
    """What "better" means for a campaign with several objectives (and outcome constraints).

    Args:
        objectives: One :class:`Objective` per optimised property (at least one).
        constraints: Outcome constraints on raw values.
        reference_point: Raw value per objective (the worst still worth having; for a target: the
            largest acceptable distance from its range), or None to infer it.

    Raises:
        ValueError: No objective, a repeated property, or a reference point of the wrong length.
    """

    def __init__(self, objectives: Sequence[Objective], constraints: Sequence[Constraint] = (),
                 reference_point: Sequence[float] | None = None) -> None:
        self.objectives = [Objective.from_any(o) for o in objectives]
        if not self.objectives:
            raise ValueError("objectives: give at least one")
        names = [o.property for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each property once, got {names}")
        if reference_point is not None and len(reference_point) != len(self.objectives):
            raise ValueError(f"reference_point: needs {len(self.objectives)} values (one per objective), "
                             f"got {len(reference_point)}")
        self.constraints = list(constraints)
        self.reference_point = None if reference_point is None else [float(v) for v in reference_point]
        self.properties = names + sorted({c.property for c in self.constraints} - set(names),
                                         key=[c.property for c in self.constraints].index)

    def __repr__(self) -> str:
        goals = ", ".join(f"{o.goal} {o.property}" for o in self.objectives)
        extra = f"; {', '.join(map(str, self.constraints))}" if self.constraints else ""
        return f"MultiObjective({goals}{extra})"

    @classmethod
    def from_campaign(cls, cfg: Any) -> MultiObjective:
        """From a ``sdl.config.CampaignConfig`` (its ``objectives`` or its one ``objective``)."""
        objectives = cfg.objectives if getattr(cfg, "objectives", None) is not None else [cfg.objective]
        constraints = [Constraint(c.property, c.op, float(c.value)) for c in getattr(cfg, "constraints", []) or []]
        return cls([Objective.from_any(o) for o in objectives], constraints, getattr(cfg, "reference_point", None))

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any]) -> MultiObjective:
        """From a campaign's stored configuration (:meth:`sdl.config.CampaignConfig.snapshot`).

        Raises:
            ValueError: The snapshot names no objective.
        """
        objectives = snapshot.get("objectives") or [snapshot.get("objective")]
        if not all(isinstance(o, Mapping) and o.get("property") for o in objectives):
            raise ValueError("the stored configuration names no objective property")
        constraints = [Constraint(str(c["property"]), c["op"], float(c["value"]))
                       for c in snapshot.get("constraints") or [] if isinstance(c, Mapping)]
        return cls([Objective.from_any(dict(o)) for o in objectives], constraints, snapshot.get("reference_point"))

    @property
    def n_objectives(self) -> int:
        """``m``, the number of objectives."""
        return len(self.objectives)

    # -- on raw values (numpy) ----------------------------------------------------------------
    def utilities(self, Y: np.ndarray) -> np.ndarray:
        """``n x p`` raw values (columns :attr:`properties`) -> ``n x m`` utilities."""
        Y = np.asarray(Y, dtype=np.float64).reshape(-1, len(self.properties))
        return np.stack([np.asarray(o.utility(Y[:, j])) for j, o in enumerate(self.objectives)], axis=1)

    def feasible(self, Y: np.ndarray) -> np.ndarray:
        """``[n]`` True where every objective is measured and every constraint is met."""
        Y = np.asarray(Y, dtype=np.float64).reshape(-1, len(self.properties))
        ok = np.isfinite(Y).all(axis=1)
        for c in self.constraints:
            with np.errstate(invalid="ignore"):
                ok &= np.asarray(c.slack(Y[:, self.properties.index(c.property)])) <= 0.0
        return np.asarray(ok, dtype=bool)

    def front(self, Y: np.ndarray) -> np.ndarray:
        """``[n]`` True for the feasible rows on the Pareto front."""
        feasible = self.feasible(Y)
        mask = np.zeros(feasible.shape[0], dtype=bool)
        idx = np.flatnonzero(feasible)
        if idx.size:
            mask[idx[pareto_mask(self.utilities(Y)[idx])]] = True
        return mask

    def reference_utility(self, Y: np.ndarray | None = None) -> np.ndarray:
        """The reference point as utilities: from ``reference_point``, else inferred from ``Y``'s front.

        Raises:
            ValueError: No reference point given and no row of ``Y`` to infer it from.
        """
        if self.reference_point is not None:
            ref = []
            for o, r in zip(self.objectives, self.reference_point, strict=True):
                ref.append(-abs(r) if o.goal == "target" else float(o.scalar_utility(r)))
            return np.asarray(ref, dtype=np.float64)
        if Y is None:
            raise ValueError("reference_point: none given and no measurements to infer it from")
        U = self.utilities(Y)
        rows = self.front(Y)
        if not rows.any():  # nothing feasible yet: the worst of what was measured
            rows = np.isfinite(U).all(axis=1)
        if not rows.any():
            raise ValueError("reference_point: none given and no complete measurement to infer it from")
        import torch
        from botorch.utils.multi_objective.hypervolume import infer_reference_point

        return np.asarray(infer_reference_point(torch.as_tensor(U[rows])).numpy(), dtype=np.float64)

    def hypervolume(self, Y: np.ndarray, ref: np.ndarray) -> float:
        """Hypervolume of the feasible rows of ``Y`` (raw, ``n x p``) above ``ref`` (utilities)."""
        Y = np.asarray(Y, dtype=np.float64).reshape(-1, len(self.properties))
        feasible = self.feasible(Y)
        return hypervolume(self.utilities(Y[feasible]), ref) if feasible.any() else 0.0

    def hypervolume_curve(self, Y: np.ndarray, ref: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """``[n]`` hypervolume of the first ``i + 1`` rows of ``Y``, divided by ``scale``."""
        Y = np.asarray(Y, dtype=np.float64).reshape(-1, len(self.properties))
        out = np.zeros(Y.shape[0], dtype=np.float64)
        front = np.zeros((0, len(self.properties)))
        current = 0.0
        feasible = self.feasible(Y)
        for i in range(Y.shape[0]):
            if feasible[i]:
                front = np.vstack([front, Y[i : i + 1]])
                front = front[self.front(front)]
                current = self.hypervolume(front, ref)
            out[i] = current / scale
        return out

    # -- on posterior samples (torch) ---------------------------------------------------------
    def mc_objective(self) -> Any:
        """BoTorch ``GenericMCMultiOutputObjective``: samples ``... x q x p`` -> utilities ``... x q x m``."""
        import torch
        from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective

        objectives = self.objectives

        def utilities(samples: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
            return torch.stack([o.utility(samples[..., j]) for j, o in enumerate(objectives)], dim=-1)

        return GenericMCMultiOutputObjective(utilities)

    def mc_constraints(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One callable per constraint: samples ``... x q x p`` -> slack ``... x q`` (``<= 0`` feasible)."""
        out: list[Callable[[torch.Tensor], torch.Tensor]] = []
        for c in self.constraints:
            column = self.properties.index(c.property)

            def slack(samples: torch.Tensor, c: Constraint = c, column: int = column) -> torch.Tensor:
                s: torch.Tensor = c.slack(samples[..., column])
                return s

            out.append(slack)
        return out
