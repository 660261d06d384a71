"""CHGNet energies of crystals on CPU: a single point, or after relaxing with CHGNet's ``StructOptimizer``.

The energy reported is CHGNet's energy per atom minus its AtomRef elemental reference energies
(the backbone's prior, :class:`sdl.engine.models.backbones.chgnet.CHGNetBackbone`): with the
elements at zero it is a formation-energy-like scale, so a convex hull over it needs no elemental
crystal structures (the data hold none). Known phases and candidates are put on the same scale by
computing both with this one model (see :mod:`sdl.generation.hull`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from sdl.engine.models.backbones.chgnet import CHGNetBackbone

__all__ = ["Energy", "CHGNetEnergies"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Energy:
    """One crystal's CHGNet result.

    Args:
        structure: The final structure (relaxed, or the input for a single point).
        energy_per_atom: CHGNet energy per atom above its AtomRef references (eV/atom); NaN on failure.
        steps: Relaxation steps taken (0 for a single point).
        error: Why no energy could be computed, else None.
    """

    structure: Structure
    energy_per_atom: float
    steps: int = 0
    error: str | None = None


class CHGNetEnergies:
    """CHGNet 0.3.0 (the weights in the wheel) for energies and relaxations, loaded once.

    Args:
        fmax: Force threshold of a relaxation (eV/Å).
        steps: Most optimiser steps per relaxation.
    """

    def __init__(self, *, fmax: float = 0.1, steps: int = 200) -> None:
        from sdl.engine.models.backbones.chgnet import CHGNetBackbone

        self.backbone: CHGNetBackbone = CHGNetBackbone(batch_size=32)
        self.fmax = float(fmax)
        self.steps = int(steps)
        self._optimizer: object | None = None

    def static(self, structures: Sequence[Structure]) -> list[Energy]:
        """Single-point energies (no relaxation) for every structure, in batches."""
        feats = self.backbone.featurize(list(structures))
        out = []
        for i, s in enumerate(structures):
            value = float(feats.prior[i])
            error = feats.errors.get(i)
            out.append(Energy(s, value if error is None and math.isfinite(value) else math.nan, 0, error))
        return out

    def relax(self, structure: Structure) -> Energy:
        """Relax cell and positions (FIRE, ``FrechetCellFilter``), then the energy of the final structure."""
        if self._optimizer is None:
            from chgnet.model import StructOptimizer

            with contextlib.redirect_stdout(io.StringIO()):  # "CHGNet will run on cpu"
                self._optimizer = StructOptimizer(model=self.backbone.model, use_device="cpu",
                                                  on_isolated_atoms="ignore")
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                result = self._optimizer.relax(  # type: ignore[attr-defined]
                    structure, fmax=self.fmax, steps=self.steps, verbose=False
                )
        except Exception as exc:  # noqa: BLE001 - an exploding cell is one bad candidate, not a crash
            return Energy(structure, math.nan, 0, f"relaxation failed: {exc}")
        final: Structure = result["final_structure"]
        steps = len(result["trajectory"].energies)
        energy = self.static([final])[0]
        return Energy(final, energy.energy_per_atom, steps, energy.error)
