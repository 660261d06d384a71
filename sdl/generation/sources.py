"""The known crystals that generation starts from: a CSV(.gz) with an id, a CIF column and maybe an energy.

Reading checks the file and the columns before anything runs (a :class:`GenerationError` naming
the file and column); rows whose CIF does not parse are kept aside with their reason so the
caller can name them in one summary line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdl.generation import GenerationError

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["KnownTable", "read_known"]


@dataclass
class KnownTable:
    """Parsed rows of a structures table.

    Args:
        source: File name (for messages).
        ids: Id of each parsed row.
        structures: Its structure.
        energies: Its energy per atom from the table (NaN where empty), or None without an energy column.
        skipped: Row id -> why it was left out (the CIF does not parse).
    """

    source: str
    ids: list[str]
    structures: list[Structure]
    energies: list[float] | None
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def read_known(
    path: str | Path,
    *,
    structure_column: str = "cif",
    id_column: str = "id",
    energy_column: str | None = None,
    max_rows: int | None = None,
) -> KnownTable:
    """Read and parse a structures table.

    Raises:
        GenerationError: The file is missing or unreadable, or a named column is not in it.
    """
    import pandas as pd

    from sdl.engine.space import parse_structure

    p = Path(path)
    if not p.is_file():
        raise GenerationError(f"{p}: file not found")
    try:
        frame = pd.read_csv(p, nrows=max_rows, dtype={id_column: str})
    except Exception as exc:
        raise GenerationError(f"{p}: cannot read as CSV: {exc}") from exc
    for role, col in (("--structure-column", structure_column), ("--id-column", id_column),
                      ("--energy-column", energy_column)):
        if col is not None and col not in frame.columns:
            raise GenerationError(f"{p}: no column {col!r} ({role}); its columns are {list(frame.columns)}")
    ids: list[str] = []
    structures: list[Structure] = []
    energies: list[float] = []
    skipped: dict[str, str] = {}
    for i, row in frame.iterrows():
        rid = str(row[id_column]) if not pd.isna(row[id_column]) else f"row {int(str(i)) + 2}"
        text = row[structure_column]
        try:
            if pd.isna(text) or not str(text).strip():
                raise ValueError("empty structure")
            structure = parse_structure(str(text), "cif")
            if len(structure) == 0:
                raise ValueError("no sites")
        except ValueError as exc:
            skipped[rid] = str(exc).splitlines()[0][:200]
            continue
        ids.append(rid)
        structures.append(structure)
        if energy_column is not None:
            value = pd.to_numeric(row[energy_column], errors="coerce")
            energies.append(float(value) if not pd.isna(value) else math.nan)
    return KnownTable(str(p), ids, structures, energies if energy_column is not None else None, skipped)
