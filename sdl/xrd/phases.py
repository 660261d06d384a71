"""Known phases that may form instead of a target: polymorphs and site variants of its composition.

Why by composition: a synthesis aimed at a crystal keeps its elements in the crucible (in these
perovskite tables every phase is a 5-atom ABX3 cell), so what forms instead is another structure
of the same composition: a different distortion (tetragonal, rhombohedral, ... in the Materials
Project and OQMD tables), the A and B cations on swapped sites, or another anion order (CMR).
Entries that are the target itself under pymatgen's ``StructureMatcher`` (e.g. the same cubic
cell computed by another database) are not competitors, and duplicates among the competitors
are reduced to one.

A table is a CSV(.gz) with ``id`` and ``cif`` columns, and optionally ``formula`` (used to find a
composition without parsing every CIF) and ``space_group``; the project ships
``simulators/worlds/competing_phases_demo.csv.gz`` (see its SOURCE.md).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdl.csvfiles import READ_ERRORS, read_dict_rows

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["Phase", "PhaseTable", "PhaseTableError", "parse_cif", "reduced_formula"]

logger = logging.getLogger(__name__)


class PhaseTableError(ValueError):
    """A phase table that cannot be read; the message names the file (and row or column)."""


def reduced_formula(formula: str) -> str:
    """pymatgen's reduced formula (``"Sr2Ti2O6"`` → ``"SrTiO3"``)."""
    from pymatgen.core import Composition

    return str(Composition(formula).reduced_formula)


def parse_cif(cif: str, what: str) -> Structure:
    """A structure from CIF text (pymatgen's rounding notices silenced).

    Raises:
        PhaseTableError: naming ``what`` when the text is no parsable CIF.
    """
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Issues encountered while parsing CIF")
            return Structure.from_str(cif, fmt="cif")
    except Exception as exc:  # noqa: BLE001 - pymatgen raises many kinds for a bad CIF
        raise PhaseTableError(f"{what}: CIF does not parse: {type(exc).__name__}: {exc}") from None


@dataclass
class Phase:
    """One known phase: an id, its composition, its structure (parsed on first use).

    Attributes:
        phase_id: Id in its table (``perov_12``, ``mp-5229``, ``oqmd-1234``).
        formula: Reduced formula.
        cif: The structure as CIF text.
        space_group: Space-group symbol when the table gives one.
    """

    phase_id: str
    formula: str
    cif: str
    space_group: str = ""
    _structure: Structure | None = field(default=None, repr=False, compare=False)

    @property
    def structure(self) -> Structure:
        """The parsed structure."""
        if self._structure is None:
            self._structure = parse_cif(self.cif, f"phase {self.phase_id}")
        return self._structure

    @property
    def label(self) -> str:
        """``id (formula, space group)`` for messages."""
        group = f", {self.space_group}" if self.space_group else ""
        return f"{self.phase_id} ({self.formula}{group})"


class PhaseTable:
    """Phases grouped by reduced composition; :meth:`competitors` answers "what else may form?".

    Args:
        phases: The known phases.
        source: Where they came from (for messages).
    """

    def __init__(self, phases: Sequence[Phase], *, source: str = "<phases>") -> None:
        self.source = source
        self._by_formula: dict[str, list[Phase]] = {}
        self._by_id: dict[str, Phase] = {}
        for phase in phases:
            if phase.phase_id in self._by_id:
                raise PhaseTableError(f"{source}: phase id {phase.phase_id!r} appears twice")
            self._by_id[phase.phase_id] = phase
            self._by_formula.setdefault(phase.formula, []).append(phase)
        self._lock = threading.Lock()
        self._competitors: dict[str, list[Phase]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_formula.values())

    @classmethod
    def load(cls, path: str | Path) -> PhaseTable:
        """Read a CSV(.gz) table with ``id`` and ``cif`` columns (``formula`` and ``space_group`` optional).

        Raises:
            PhaseTableError: The file is missing or unreadable, lacks a column, or a row's CIF
                does not parse (only checked for rows without a formula).
        """
        path = Path(path)
        if not path.is_file():
            raise PhaseTableError(f"{path}: phase table not found")
        try:
            columns, rows = read_dict_rows(path)
        except READ_ERRORS as exc:
            raise PhaseTableError(f"{path}: cannot read phase table: {exc}") from exc
        for column in ("id", "cif"):
            if column not in columns:
                raise PhaseTableError(f"{path}: phase table needs column {column!r} (has {columns})")
        phases = []
        for number, row in enumerate(rows, start=2):
            ident, cif = (row.get("id") or "").strip(), row.get("cif") or ""
            if not ident or not cif.strip():
                raise PhaseTableError(f"{path}:{number}: empty id or cif")
            text = (row.get("formula") or "").strip()
            if not text:
                formula = parse_cif(cif, f"{path}:{number}").composition.reduced_formula
            else:
                try:
                    formula = reduced_formula(text)
                except (ValueError, KeyError) as exc:
                    raise PhaseTableError(f"{path}:{number} column 'formula': {text!r} is no formula: {exc}") from None
            phases.append(Phase(ident, str(formula), cif, (row.get("space_group") or "").strip()))
        logger.info("phase table %s: %d phases of %d compositions", path, len(phases),
                    len({p.formula for p in phases}))
        return cls(phases, source=str(path))

    def get(self, phase_id: str) -> Phase:
        """The phase with this id.

        Raises:
            KeyError: naming the id and the table.
        """
        try:
            return self._by_id[phase_id]
        except KeyError:
            raise KeyError(f"no phase {phase_id!r} in {self.source}") from None

    def of_formula(self, formula: str) -> list[Phase]:
        """Every phase of a composition (any formula spelling)."""
        return list(self._by_formula.get(reduced_formula(formula), []))

    def competitors(self, target_id: str, target: Structure) -> list[Phase]:
        """Phases of the target's composition that are not the target (``StructureMatcher``), de-duplicated.

        Cached per ``target_id``.
        """
        with self._lock:
            found = self._competitors.get(target_id)
        if found is not None:
            return list(found)
        from pymatgen.analysis.structure_matcher import StructureMatcher

        matcher = StructureMatcher()
        kept: list[Phase] = []
        for phase in self._by_formula.get(target.composition.reduced_formula, []):
            if phase.phase_id == target_id:
                continue
            try:
                structure = phase.structure
            except PhaseTableError as exc:
                logger.warning("%s: %s; skipped", self.source, exc)
                continue
            if matcher.fit(target, structure) or any(matcher.fit(structure, k.structure) for k in kept):
                continue
            kept.append(phase)
        with self._lock:
            self._competitors[target_id] = kept
        return list(kept)
