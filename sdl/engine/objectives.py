"""Objectives: maximize, minimize or hit a target range, as one utility per measurement (higher = better).

Choice made here (and why): the models learn the *raw* property (band gap, toughness), because
that is what was measured and what the uncertainty metrics are about; the acquisition works on
the *utility* through a BoTorch ``GenericMCObjective`` applied to posterior samples. So a
target range (e.g. band gap 1.1-1.7 eV, utility = minus the distance to the range, 0 inside)
rewards candidates whose whole predictive distribution sits in the band, which fitting a model
on the kinked utility itself would blur.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Objective"]

logger = logging.getLogger(__name__)

Goal = Literal["maximize", "minimize", "target"]


@dataclass(frozen=True)
class Objective:
    """One property and what "better" means for it.

    Args:
        goal: ``maximize``, ``minimize`` or ``target``.
        target_range: ``(low, high)`` for ``target`` (ignored otherwise).
        property: Property name (e.g. ``gap_gllbsc``), for logs and records.
        unit: Unit text.
        extensive: The property scales with the cell (see :mod:`sdl.engine.models.extensive`).
    """

    goal: Goal = "maximize"
    target_range: tuple[float, float] | None = None
    property: str = "y"
    unit: str | None = None
    extensive: bool = False

    def __post_init__(self) -> None:
        if self.goal not in ("maximize", "minimize", "target"):
            raise ValueError(f"objective.goal must be maximize, minimize or target, got {self.goal!r}")
        if self.goal == "target":
            tr: Sequence[float] | None = self.target_range  # callers pass lists too
            if tr is None or len(tr) != 2 or not float(tr[0]) <= float(tr[1]):
                raise ValueError(f"objective.target_range must be (low, high) with low <= high, got {tr!r}")
            object.__setattr__(self, "target_range", (float(tr[0]), float(tr[1])))

    @classmethod
    def from_any(cls, obj: Any) -> Objective:
        """From ``cfg.objective`` (pydantic), a dict, or an Objective."""
        if isinstance(obj, Objective):
            return obj
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
        tr = get("target_range", None)
        return cls(
            goal=get("goal", "maximize"),
            target_range=None if tr is None else (float(tr[0]), float(tr[1])),
            property=get("property", "y") or "y",
            unit=get("unit", None),
            extensive=bool(get("extensive", False)),
        )

    def utility(self, y: Any) -> Any:
        """Utility of raw values (tensor in -> tensor out, with gradients; else numpy array).

        Torch is only touched for tensors, so the repository and the lab can rank values without it.
        """
        if type(y).__module__.startswith("torch"):
            import torch

            t: Any = y
            clamp: Any = lambda x: torch.clamp(x, min=0.0)  # noqa: E731
        else:
            t = np.array(y, dtype=np.float64)  # a copy, as the tensor path returns a new array
            clamp = lambda x: np.maximum(x, 0.0)  # noqa: E731
        if self.goal == "maximize":
            return t
        if self.goal == "minimize":
            return -t
        lo, hi = self._range()
        return -(clamp(lo - t) + clamp(t - hi))

    def optimistic(self, mean: torch.Tensor, std: torch.Tensor, beta: float) -> torch.Tensor:
        """Upper bound of the utility over ``mean ± sqrt(beta) * std`` (a cheap pre-filter score).

        Every utility here is 1-Lipschitz, so ``utility(mean) + sqrt(beta) * std`` bounds it.
        """
        score: torch.Tensor = self.utility(mean) + float(beta) ** 0.5 * std
        return score

    def mc_objective(self) -> Any:
        """BoTorch ``GenericMCObjective``: ``samples (... x q x 1)`` -> utilities ``(... x q)``."""
        from botorch.acquisition.objective import GenericMCObjective

        def utilities(samples: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
            u: torch.Tensor = self.utility(samples[..., 0])
            return u

        return GenericMCObjective(utilities)

    def best_value(self, values: Sequence[float] | np.ndarray) -> float | None:
        """The measured value with the highest utility (None when there is none)."""
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            return None
        return float(arr[int(np.argmax(self.utility(arr)))])

    def best_utility(self, values: Sequence[float] | np.ndarray) -> float | None:
        """Highest utility among measured values (None when there is none)."""
        best = self.best_value(values)
        return None if best is None else self.scalar_utility(best)

    def scalar_utility(self, value: float) -> float:
        """Utility of one raw value, in plain float arithmetic (NaN stays NaN)."""
        v = float(value)
        if self.goal == "maximize":
            return v
        if self.goal == "minimize":
            return -v
        lo, hi = self._range()
        return -(max(lo - v, 0.0) + max(v - hi, 0.0))

    def _range(self) -> tuple[float, float]:
        if self.target_range is None:
            raise ValueError("objective.target_range is not set")
        return self.target_range

    def is_better(self, a: float, b: float | None) -> bool:
        """Whether raw value ``a`` is strictly better than ``b`` (anything finite beats None).

        maximize: ``a > b``; minimize: ``a < b``; target: ``a`` is nearer the range (higher
        utility), so two values inside the range are equally good. A NaN is never better.
        """
        ua = self.scalar_utility(a)
        if math.isnan(ua):
            return False
        if b is None:
            return True
        ub = self.scalar_utility(b)
        return math.isnan(ub) or ua > ub

    def reached(self, best_value: float | None, goal_value: float | None = None) -> bool:
        """Whether a stopping goal is met by the best measured value.

        Args:
            best_value: Best measured raw value so far (:meth:`best_value`); None = nothing measured.
            goal_value: Raw value to reach for maximize (``best >= goal_value``) and minimize
                (``best <= goal_value``); None = never reached. Unused for target: the goal is met
                when the best value is inside the range (utility >= 0).
        """
        if best_value is None or math.isnan(float(best_value)):
            return False
        if self.goal == "target":
            return self.scalar_utility(best_value) >= 0.0
        if goal_value is None:
            return False
        if self.goal == "maximize":
            return float(best_value) >= float(goal_value)
        return float(best_value) <= float(goal_value)
