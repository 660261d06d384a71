"""XRD phase identification on the demo world: how often the verdict is right, and how fast.

For each crystal of ``simulators/worlds/perovskites_demo.csv.gz`` a sample is drawn by the
simulator's impurity model (``--rate`` of them impure: a real competing phase of the same
composition as majority phase, the target 0–30 %), rendered with ``--strain`` lattice strain and
``--noise`` intensity noise, and analysed against the target and its competing phases
(``simulators/worlds/competing_phases_demo.csv.gz``). Prints (or, with ``--json``, writes):

* ``verdict_accuracy``: share of samples whose "target formed?" verdict matches the truth, with
  ``formed_but_impure`` and ``pure_but_rejected`` counts;
* ``majority_phase_accuracy``: the identified phase is the sample's majority phase;
* ``target_fraction_mae``: mean absolute error of the estimated target fraction;
* ``references_per_s``: reference patterns simulated per second (pymatgen, cold cache);
* ``identifications_per_s``: analyses per second with the references cached.

Run: ``python benchmarks/phase_identification.py [--n 400] [--rate 0.5] [--strain 0.005] [--noise 0.05] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdl.xrd import PhaseIdentifier, PhaseTable, ReferenceLibrary
from sdl.xrd.phases import parse_cif
from simulators.impurities import ImpurityModel

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "simulators" / "worlds" / "perovskites_demo.csv.gz"
PHASES = ROOT / "simulators" / "worlds" / "competing_phases_demo.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="crystals of the demo world to sample (max 400)")
    parser.add_argument("--rate", type=float, default=0.5, help="impurity rate of the simulated samples")
    parser.add_argument("--strain", type=float, default=0.005, help="largest lattice strain of a sample")
    parser.add_argument("--noise", type=float, default=0.05, help="relative intensity noise per reflection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    with gzip.open(WORLD, "rt", newline="") as handle:
        cifs = {row["id"]: row["cif"] for row in csv.DictReader(handle)}
    ids = sorted(cifs)[: args.n]
    table = PhaseTable.load(PHASES)
    model = ImpurityModel(table, rate=args.rate, seed=args.seed, strain=args.strain, intensity_noise=args.noise)
    library = ReferenceLibrary(table)
    identifier = PhaseIdentifier()

    started = time.perf_counter()
    sets = {cid: library.references(cid, parse_cif(cifs[cid], cid)) for cid in ids}
    reference_s = time.perf_counter() - started
    samples = {cid: model.phases_of(cid, cifs[cid], f"bench-{cid}") for cid in ids}
    patterns = {cid: model.pattern(samples[cid], cifs[cid]) for cid in ids}

    right = majority = formed_but_impure = pure_but_rejected = 0
    abs_error = 0.0
    started = time.perf_counter()
    for cid in ids:
        target, competitors = sets[cid]
        rows = patterns[cid]
        analysis = identifier.identify([r[0] for r in rows], [r[1] for r in rows], target, competitors)
        truth = samples[cid]
        right += analysis.target_formed != truth.impure
        formed_but_impure += analysis.target_formed and truth.impure
        pure_but_rejected += (not analysis.target_formed) and not truth.impure
        majority += analysis.identified == max(truth.fractions, key=lambda k: truth.fractions[k])
        abs_error += abs(analysis.target_fraction - truth.fractions[cid])
    identify_s = time.perf_counter() - started

    n = len(ids)
    figures = {
        "n": n, "impure": sum(s.impure for s in samples.values()), "rate": args.rate, "strain": args.strain,
        "noise": args.noise, "seed": args.seed, "references": len(library.cache),
        "verdict_accuracy": round(right / n, 4), "formed_but_impure": int(formed_but_impure),
        "pure_but_rejected": int(pure_but_rejected), "majority_phase_accuracy": round(majority / n, 4),
        "target_fraction_mae": round(abs_error / n, 4),
        "references_per_s": round(len(library.cache) / reference_s, 1),
        "identifications_per_s": round(n / identify_s, 1), "identifier": repr(identifier),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:<26} {value}")


if __name__ == "__main__":
    main()
