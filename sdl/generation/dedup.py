"""De-duplication of generated crystals with the one ``StructureMatcher`` that decides material identity.

Only crystals of the same reduced formula can match, so the known structures are indexed by
formula and a candidate is compared only with those (and with the candidates kept before it).
The matcher is :func:`sdl.materials.structure_matcher`: the repository uses the same tolerances,
so a candidate kept here is also a new ``materials`` row there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sdl.materials import same_structure

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["KnownStructures"]


class KnownStructures:
    """Crystals already known (the input file), grouped by reduced formula; grows as candidates are kept.

    Args:
        structures: The known crystals.
    """

    def __init__(self, structures: Iterable[Structure] = ()) -> None:
        self._by_formula: dict[str, list[Structure]] = {}
        for s in structures:
            self.add(s)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_formula.values())

    def add(self, structure: Structure) -> None:
        """Remember a crystal (a kept candidate becomes known, so its twins are dropped)."""
        self._by_formula.setdefault(structure.composition.reduced_formula, []).append(structure)

    def formulas(self) -> set[str]:
        """Reduced formulas of every known crystal."""
        return set(self._by_formula)

    def contains(self, structure: Structure) -> bool:
        """Whether a known crystal of the same formula is the same material (``StructureMatcher``)."""
        same_formula = self._by_formula.get(structure.composition.reduced_formula, [])
        return any(same_structure(structure, known) for known in same_formula)

    def keep_if_new(self, structure: Structure) -> bool:
        """Add ``structure`` and return True unless it duplicates a known crystal."""
        if self.contains(structure):
            return False
        self.add(structure)
        return True
