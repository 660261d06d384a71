"""Rebuild ``competing_phases_demo.csv.gz``: the real phases that compete with the demo world's crystals.

Why a script: the table is data the project ships (simulated impurities, XRD references), so how
its rows were chosen must be reproducible, not described from memory. Selection: every structure of
the CMR, Materials Project and OQMD perovskite tables (``../shared/data/perovskites_cmr_mp_oqmd``)
whose reduced composition is the composition of a crystal of ``perovskites_demo.csv.gz``, with
duplicates within one composition (pymatgen ``StructureMatcher``, default tolerances) reduced to
one representative (CMR first, then MP, then OQMD). The CIF text of each row is unchanged.

Run from the repository root: ``python simulators/worlds/make_competing_phases.py``.
"""

from __future__ import annotations

import csv
import gzip
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data" / "perovskites_cmr_mp_oqmd"
OUT = HERE / "competing_phases_demo.csv.gz"
SOURCES = (("cmr", "cmr_castelli_perovskites.csv.gz", ""), ("mp", "mp_perovskites.csv.gz", ""),
           ("oqmd", "oqmd_perovskites.csv.gz", "oqmd-"))


def _rows(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with gzip.open(path, "rt", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def main() -> int:
    """Write the table; print how many rows came from each source."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Composition, Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    warnings.filterwarnings("ignore", message="Issues encountered while parsing CIF")
    wanted = {Composition(r["formula"]).reduced_formula for r in _rows(HERE / "perovskites_demo.csv.gz")}
    found: dict[str, list[tuple[str, str, Structure, str]]] = {}
    for source, name, prefix in SOURCES:
        for row in _rows(SHARED / name):
            structure = Structure.from_str(row["cif"], fmt="cif")
            formula = structure.composition.reduced_formula
            if formula in wanted:
                found.setdefault(formula, []).append((f"{prefix}{row['id']}", source, structure, row["cif"]))
    matcher = StructureMatcher()
    out: list[dict[str, str]] = []
    for formula in sorted(found):
        entries = found[formula]
        kept: list[tuple[str, str, Structure, str]] = []
        for entry in entries:  # sources are in priority order: the first of a group is kept
            if not any(matcher.fit(entry[2], k[2]) for k in kept):
                kept.append(entry)
        for ident, source, structure, cif in kept:
            group = SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()
            out.append({"id": ident, "formula": formula, "source": source, "space_group": group, "cif": cif})
    with gzip.open(OUT, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "formula", "source", "space_group", "cif"])
        writer.writeheader()
        writer.writerows(out)
    counts: dict[str, int] = {}
    for row in out:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    sys.stdout.write(f"{OUT.name}: {len(out)} phases of {len(found)} compositions {counts}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
