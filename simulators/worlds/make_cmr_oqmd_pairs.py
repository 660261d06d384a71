"""Rebuild ``perovskites_cmr_oqmd.csv.gz``: one composition per row with a CMR and an OQMD formation energy.

Why: a multi-fidelity campaign needs the same candidates described by an expensive and a cheap source.
CMR (RPBE, Castelli et al.) and OQMD (PBE, Kirklin et al.) computed formation energies of overlapping
perovskite compositions with different codes and references: a real pair of correlated "fidelities"
(Pearson 0.83 over the shared compositions). Selection, per reduced formula present in both tables of
``../shared/data/perovskites_cmr_mp_oqmd``: the CMR row with the lowest ``e_form`` (the most stable CMR
polymorph of that composition; its id, formula, e_form and CIF unchanged) and the OQMD entry with the
lowest ``formation_energy`` (its id and value unchanged). OQMD rows at or above 5 eV/atom (the one
documented outlier at ~25 eV/atom) are left out.

Run from the repository root: ``python simulators/worlds/make_cmr_oqmd_pairs.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data" / "perovskites_cmr_mp_oqmd"
OUT = HERE / "perovskites_cmr_oqmd.csv.gz"
_FORMULA_SUM = re.compile(r"_chemical_formula_sum\s+'?([^'\n]+)'?")


def main() -> int:
    """Write the table; print its size and the correlation of the two sources."""
    import pandas as pd
    from pymatgen.core import Composition

    cmr = pd.read_csv(SHARED / "cmr_castelli_perovskites.csv.gz")
    oqmd = pd.read_csv(SHARED / "oqmd_perovskites.csv.gz")
    cmr["reduced"] = [Composition(f).reduced_formula for f in cmr["formula"]]
    oqmd["reduced"] = [Composition(m.group(1)).reduced_formula if (m := _FORMULA_SUM.search(c)) else ""
                       for c in oqmd["cif"]]
    oqmd = oqmd[(oqmd["reduced"] != "") & (oqmd["formation_energy"] < 5.0)]
    best_cmr = cmr.sort_values(["e_form", "id"]).drop_duplicates("reduced")
    best_oqmd = oqmd.sort_values(["formation_energy", "id"]).drop_duplicates("reduced")
    pairs = best_cmr.merge(
        best_oqmd[["reduced", "id", "formation_energy"]].rename(
            columns={"id": "oqmd_id", "formation_energy": "oqmd_formation_energy"}),
        on="reduced",
    ).sort_values("id", key=lambda s: s.str.replace("perov_", "").astype(int))
    out = pairs[["id", "formula", "e_form", "oqmd_id", "oqmd_formation_energy", "cif"]]
    out.to_csv(OUT, index=False, compression="gzip")
    r = float(out["e_form"].corr(out["oqmd_formation_energy"]))
    sys.stdout.write(f"{OUT.name}: {len(out)} compositions, Pearson(e_form, oqmd) = {r:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
