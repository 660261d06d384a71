"""Held-out accuracy of the feasibility classifier on different features of a crystal world.

Why: the classifier weights the acquisition by P(success); which features it reads (the
surrogate's CHGNet embeddings + prior, composition descriptors, or both) and whether it uses one
lengthscale per feature (ARD) should be chosen by how well it predicts the real rule on crystals it
has not seen. Labels: the tolerance-factor robot (simulators/synthesis_rules.py).

    python benchmarks/feasibility_features.py --world simulators/worlds/perovskites_2k.csv.gz \
        --train 200 --test 1000 --seeds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="simulators/worlds/perovskites_demo.csv.gz")
    parser.add_argument("--train", type=int, default=200, help="random labelled crystals")
    parser.add_argument("--test", type=int, default=1000, help="held-out crystals (at most the rest)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sdl.benchmark import apply_synthesis_rule, load_crystal_dataset
    from sdl.engine.feasibility import GPClassifier
    from sdl.engine.models.composition import composition_features
    from sdl.engine.models.surrogate import PretrainedSurrogate
    from simulators.synthesis_rules import ToleranceFactorRule

    ds = apply_synthesis_rule(load_crystal_dataset(args.world, "e_form", "min"), ToleranceFactorRule(0.8, 1.07))
    assert ds.feasible is not None
    pool = ds.candidate_pool()
    y = torch.as_tensor(ds.feasible, dtype=torch.float64)
    embedding = PretrainedSurrogate(pool).features()
    composition = torch.as_tensor(composition_features(pool.formulas()))
    feature_sets = {"chgnet+prior": embedding, "composition": composition,
                    "both": torch.cat([embedding, composition], dim=1)}
    n_test = min(args.test, len(y) - args.train)
    print(f"{args.world}: {len(y)} crystals, base rate {float(y.mean()):.3f}, "
          f"train {args.train}, test {n_test}, seeds {args.seeds}")
    rows = []
    for name, X in feature_sets.items():
        for ard in (False, True):
            acc, nll, secs = [], [], []
            for seed in range(args.seeds):
                perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
                train, test = perm[: args.train], perm[args.train: args.train + n_test]
                t0 = time.perf_counter()
                clf = GPClassifier(seed=seed, ard=ard, optimism=0.0).fit(X[train], y[train])
                p = clf.probability(X[test])
                secs.append(time.perf_counter() - t0)
                acc.append(float(((p > 0.5).double() == y[test]).double().mean()))
                nll.append(float(-(y[test] * p.log() + (1 - y[test]) * (1 - p).clamp_min(1e-6).log()).mean()))
            row = {"features": name, "dims": X.shape[1], "ard": ard, "accuracy": float(np.mean(acc)),
                   "accuracy_per_seed": acc, "nll": float(np.mean(nll)), "fit_s": float(np.mean(secs))}
            rows.append(row)
            print(f"  {name:13s} d={X.shape[1]:3d} ard={'yes' if ard else 'no ':3s} accuracy {row['accuracy']:.3f} "
                  f"{np.round(acc, 3).tolist()}  NLL {row['nll']:.3f}  fit+predict {row['fit_s']:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"world": args.world, "base_rate": float(y.mean()), "train": args.train,
                                         "test": n_test, "seeds": args.seeds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
