"""Rediscovery of held-out stable Materials Project perovskites by `sdl generate` (prints figures, ``--json``).

Usage: ``python benchmarks/rediscovery.py [--data mp_perovskites.csv.gz] [--holdout 0.2] [--seed 0]
[--score-top 2000] [--relax 40] [--workers 2] [--json FILE]``.

* Stable: ``energy_above_hull <= 1e-6`` eV/atom (the 378 rows MP marks ``is_stable``).
* A seeded share (``--holdout``) of the stable formulas is held out; every row with a held-out
  formula (its unstable polymorphs too) leaves the input, so nothing of it is known.
* Generation from the rest: substitution probabilities only (``energy none``), and CHGNet
  single points on the ``--score-top`` most probable unique candidates ranked by energy above the
  hull of the known phases (MP formation energies, CHGNet corrected per element: ``energy static``).
  Relaxation (``energy relax``) costs seconds per crystal: only its throughput is measured, on the
  ``--relax`` most probable unique candidates.
* Rediscovered: a held-out reduced formula among the top N candidates' formulas (N = 100, 1,000).
* Uniform baseline: N distinct compositions drawn uniformly from every charge-balanced composition
  of the same prototype stoichiometries (all rows are ABC3) over the elements of the input, with
  the oxidation states of pymatgen's substitution table (so the same chemistry generation can
  write). Drawing as many distinct compositions as the top N candidates hold (polymorphs share one),
  its expected hit fraction is draws / |space| x (held-out formulas inside the space) / held out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from sdl.generation.pipeline import GenerationOptions, generate
from sdl.generation.sources import read_known

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "perovskites_cmr_mp_oqmd" / "mp_perovskites.csv.gz"
TOPS = (100, 1000)


def composition_space(elements: list[str]) -> set[frozenset[tuple[str, float]]]:
    """Every charge-balanced A B C3 composition (A, B, C distinct; A, B unordered) over ``elements``."""
    from pymatgen.core.structure_prediction.substitution_probability import SubstitutionProbability

    states: dict[str, set[int]] = {el: set() for el in elements}
    for sp in SubstitutionProbability().species:
        if sp.symbol in states and sp.oxi_state is not None and float(sp.oxi_state).is_integer():
            states[sp.symbol].add(int(sp.oxi_state))
    els = [el for el in elements if states[el]]
    offset, width = 30, 61
    sums = np.zeros((len(els), len(els), width), dtype=bool)  # A, B -> reachable oA + oB
    for i, a in enumerate(els):
        for j, b in enumerate(els):
            for oa in states[a]:
                for ob in states[b]:
                    sums[i, j, oa + ob + offset] = True
    space: set[frozenset[tuple[str, float]]] = set()
    for k, c in enumerate(els):
        need = np.zeros(width, dtype=bool)
        for oc in states[c]:
            if 0 <= -3 * oc + offset < width:
                need[-3 * oc + offset] = True
        ok = (sums & need).any(axis=2)
        for i, j in zip(*np.nonzero(np.triu(ok, 1)), strict=True):
            if k not in (i, j):
                space.add(frozenset({(els[i], 1.0), (els[j], 1.0), (c, 3.0)}))
    return space


def key(formula: str) -> frozenset[tuple[str, float]]:
    return frozenset(Composition(formula).get_el_amt_dict().items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-top", type=int, default=2000)
    parser.add_argument("--relax", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    df = pd.read_csv(args.data)
    df["reduced"] = df["formula"].map(lambda f: Composition(f).reduced_formula)
    stable = sorted(set(df.loc[df["energy_above_hull"] <= 1e-6, "reduced"]))
    rng = random.Random(args.seed)
    held = set(rng.sample(stable, round(args.holdout * len(stable))))
    rest = df[~df["reduced"].isin(held)].drop(columns="reduced")
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"rediscovery-rest-{os.getpid()}.csv"
    rest.to_csv(src, index=False)
    try:
        parents = read_known(src, energy_column="formation_energy")
    finally:
        src.unlink(missing_ok=True)
    held_keys = {key(f) for f in held}
    elements = sorted({el.symbol for s in parents.structures for el in s.composition.elements})
    t = time.perf_counter()
    space = composition_space(elements)
    space_s = time.perf_counter() - t
    in_space = len(held_keys & space)

    runs = {}
    for mode, n, score_top in (("none", max(TOPS), max(TOPS)), ("static", max(TOPS), args.score_top),
                               ("relax", args.relax, args.relax)):
        if n < 1:
            continue
        opts = GenerationOptions(n=n, energy=mode, score_top=score_top,  # type: ignore[arg-type]
                                 workers=args.workers)
        result = generate(parents, opts)
        formulas = [c.substitution.formula for c in result.candidates]
        figures = {}
        for top in TOPS:
            got = {key(f) for f in formulas[:top]}
            figures[f"top{top}"] = {
                "candidates": min(top, len(formulas)), "distinct_compositions": len(got),
                "rediscovered": len(got & held_keys), "fraction": len(got & held_keys) / len(held_keys),
                "uniform_fraction": min(len(got), len(space)) / len(space) * in_space / len(held_keys),
            }
        runs[mode] = {
            "seconds": result.seconds, "substitutions": result.n_substitutions, "unique": result.n_unique,
            "scored": result.n_scored, "crystals_per_minute": 60 * result.n_unique / result.seconds,
            "hull_scale": result.hull_scale, "stage_seconds": result.stage_seconds,
            "energy_crystals_per_minute": (60 * result.n_unique / result.stage_seconds["energy"]
                                           if result.stage_seconds.get("energy") else None),
            **figures,
        }
        print(f"[{mode}] {result.n_unique} unique crystals ({result.n_scored} with CHGNet energies) in "
              f"{result.seconds:.0f} s = {runs[mode]['crystals_per_minute']:.0f} crystals/min; stages (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in result.stage_seconds.items()))
        for top in TOPS if mode != "relax" else ():
            f = figures[f"top{top}"]
            print(f"  top {top}: rediscovered {f['rediscovered']}/{len(held_keys)} = {f['fraction']:.3f} "
                  f"(uniform draw {f['uniform_fraction']:.4f})")
    summary = {
        "data": args.data.name, "stable": len(stable), "held_out": len(held), "input_rows": len(rest),
        "parents_parsed": len(parents), "elements": len(elements),
        "composition_space": len(space), "held_out_in_space": in_space, "space_seconds": space_s,
        "seed": args.seed, "workers": args.workers, "score_top": args.score_top, "runs": runs,
    }
    print(f"{len(stable)} stable formulas, {len(held)} held out ({in_space} inside the {len(space)}-composition "
          f"uniform space), {len(rest)} input rows")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
