"""Energy above the convex hull of the known phases (pymatgen ``PhaseDiagram``), one chemical system at a time.

Energies are per atom on a formation-energy scale: every element sits at zero, so the hull needs
no elemental crystal structures. Two consistent choices are offered, and the caller states which:

* ``chgnet`` -- known phases and candidates both with CHGNet's energy above its AtomRef
  references (:mod:`sdl.generation.relax`): one model, one scale, nothing fitted.
* ``table`` -- known phases with the table's formation energies (e.g. the Materials Project's
  ``formation_energy``, eV/atom); candidates with CHGNet plus a per-element linear correction
  fitted on the known phases (least squares of table minus CHGNet on the element fractions), so
  that CHGNet's systematic offset per element does not decide the ranking.

A hull over all elements at once would be an 80-dimensional convex hull; a candidate only needs
the phases of its own chemical system, so one small ``PhaseDiagram`` is built (and cached) per
system.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Composition

__all__ = ["ConvexHull", "ElementCorrection"]

logger = logging.getLogger(__name__)


class ConvexHull:
    """The known phases' hull, queried per chemical system.

    Args:
        compositions: Composition of each known phase.
        energies_per_atom: Its formation energy per atom (eV/atom); NaN rows are left out.
    """

    def __init__(self, compositions: Sequence[Composition], energies_per_atom: Sequence[float]) -> None:
        if len(compositions) != len(energies_per_atom):
            raise ValueError(f"{len(compositions)} compositions but {len(energies_per_atom)} energies")
        self._phases = [(c, float(e)) for c, e in zip(compositions, energies_per_atom, strict=True)
                        if math.isfinite(float(e))]
        self._diagrams: dict[frozenset[str], PhaseDiagram] = {}

    def __len__(self) -> int:
        return len(self._phases)

    def _diagram(self, system: frozenset[str]) -> PhaseDiagram:
        if system not in self._diagrams:
            from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
            from pymatgen.core import Composition

            entries = [PDEntry(Composition(el), 0.0) for el in sorted(system)]
            for comp, e in self._phases:
                if {el.symbol for el in comp.elements} <= system:
                    entries.append(PDEntry(comp, e * comp.num_atoms))
            self._diagrams[system] = PhaseDiagram(entries)
        return self._diagrams[system]

    def e_above_hull(self, composition: Composition, energy_per_atom: float) -> float:
        """eV/atom above the hull of the known phases; negative when below it (a new stable phase)."""
        from pymatgen.analysis.phase_diagram import PDEntry

        if not math.isfinite(energy_per_atom):
            return math.nan
        system = frozenset(el.symbol for el in composition.elements)
        diagram = self._diagram(system)
        entry = PDEntry(composition, energy_per_atom * composition.num_atoms)
        _, e_hull = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
        return math.nan if e_hull is None else float(e_hull)


class ElementCorrection:
    """Per-element energy shift that maps CHGNet energies onto a table's scale (fitted by ridge least squares).

    Args:
        compositions: Known phases.
        chgnet: Their CHGNet energies per atom.
        table: Their table energies per atom.
        ridge: L2 penalty on the per-element shifts (eV/atom), keeps rare elements near zero.
    """

    def __init__(self, compositions: Sequence[Composition], chgnet: Sequence[float], table: Sequence[float],
                 ridge: float = 1e-3) -> None:
        rows = [i for i in range(len(compositions)) if math.isfinite(chgnet[i]) and math.isfinite(table[i])]
        self.elements = sorted({el.symbol for i in rows for el in compositions[i].elements})
        self.shift: dict[str, float] = dict.fromkeys(self.elements, 0.0)
        if not rows:
            return
        col = {el: j for j, el in enumerate(self.elements)}
        X = np.zeros((len(rows), len(self.elements)))
        for r, i in enumerate(rows):
            for el, frac in compositions[i].fractional_composition.get_el_amt_dict().items():
                X[r, col[el]] = frac
        y = np.asarray([table[i] - chgnet[i] for i in rows])
        A = X.T @ X + ridge * np.eye(len(self.elements))
        coef = np.linalg.solve(A, X.T @ y)
        self.shift = {el: float(c) for el, c in zip(self.elements, coef, strict=True)}
        residual = y - X @ coef
        self.rmse = float(np.sqrt(np.mean(residual**2)))
        logger.info("CHGNet -> table correction on %d phases: residual RMSE %.3f eV/atom", len(rows), self.rmse)

    def __call__(self, composition: Composition, chgnet_energy: float) -> float:
        """CHGNet energy per atom on the table's scale (elements never seen get no shift)."""
        fractions = composition.fractional_composition.get_el_amt_dict()
        return float(chgnet_energy + sum(self.shift.get(el, 0.0) * f for el, f in fractions.items()))
