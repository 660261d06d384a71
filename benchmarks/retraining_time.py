"""Retraining time of the GNN ensemble (cold and warm start) and of the GP vs training-set size.

Why: a closed loop retrains after every batch of measurements, so the retraining time bounds how
fast the lab can go. This script prints figures; it asserts nothing and is not a test.

    OMP_NUM_THREADS=1 python benchmarks/retraining_time.py [--sizes 50,100,200,400] [--members 5]
        [--epochs 150] [--gp-sizes 50,100,200,400,600] [--threads 1]

Data: the shipped real slices (``simulators/worlds/perovskites_2k.csv.gz``, target ``e_form``; and
``simulators/worlds/crossed_barrel.csv`` for the GP, target ``toughness``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ROOT / "simulators" / "worlds"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def ensemble_times(sizes: list[int], members: int, epochs: int, seed: int) -> list[dict[str, float]]:
    """Cold fit on n crystals, then a warm refit after adding 5 % more (the loop's typical step)."""
    from pymatgen.core import Structure

    from sdl.engine.models.ensemble import GNNEnsemble

    df = pd.read_csv(WORLDS / "perovskites_2k.csv.gz")
    need = int(max(sizes) * 1.05) + 2
    df = df.sample(n=min(need, len(df)), random_state=seed).reset_index(drop=True)
    t0 = time.perf_counter()
    structures = [Structure.from_str(c, fmt="cif") for c in df["cif"]]
    parse_s = time.perf_counter() - t0
    print(f"parsed {len(structures)} CIFs in {parse_s:.1f} s")
    y = df["e_form"].to_numpy(dtype=float)
    keys = df["id"].astype(str).tolist()
    rows = []
    for n in sizes:
        n_warm = round(n * 1.05) + 1
        ens = GNNEnsemble({"members": members, "epochs": epochs}, seed=seed)
        # graphs are cached by key: build them once so the figures are training time
        ens.graphs(structures[:n_warm], keys[:n_warm])
        cold = ens.fit(structures[:n], y[:n], keys[:n])
        warm = ens.fit(structures[:n_warm], y[:n_warm], keys[:n_warm])
        t1 = time.perf_counter()
        ens.predict(structures[:n_warm], keys[:n_warm])
        pred_s = time.perf_counter() - t1
        rows.append(
            {
                "n": n,
                "cold_s": cold.seconds,
                "cold_epochs": float(np.mean(cold.epochs_run)),
                "warm_n": n_warm,
                "warm_s": warm.seconds,
                "warm_epochs": float(np.mean(warm.epochs_run)),
                "predict_s": pred_s,
            }
        )
        r = rows[-1]
        print(
            f"ensemble M={members} n={n:5d}: cold {r['cold_s']:7.2f} s ({r['cold_epochs']:.0f} epochs/member), "
            f"warm n={n_warm} {r['warm_s']:7.2f} s ({r['warm_epochs']:.0f} epochs/member), predict {pred_s:.3f} s",
            flush=True,
        )
    return rows


def gp_times(sizes: list[int], seed: int) -> list[dict[str, float]]:
    """Fit the project's GP baseline (``sdl.engine.models.gp.fit_gp``, Matern-5/2 ARD) on n crossed-barrel designs."""
    from sdl.engine.models.gp import fit_gp, predict_gp

    df = pd.read_csv(WORLDS / "crossed_barrel.csv")
    g = df.groupby(["n", "theta", "r", "t"], as_index=False)["toughness"].mean()
    g = g.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    X_all = torch.tensor(g[["n", "theta", "r", "t"]].to_numpy(), dtype=torch.float64)
    Y_all = torch.tensor(g[["toughness"]].to_numpy(), dtype=torch.float64)
    rows = []
    for n in sizes:
        n = min(n, len(g))
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        bounds = torch.stack([X_all.min(0).values, X_all.max(0).values])
        model = fit_gp(X_all[:n], Y_all[:n, 0], bounds=bounds)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        predict_gp(model, X_all)
        pred_s = time.perf_counter() - t1
        rows.append({"n": n, "fit_s": fit_s, "predict_s": pred_s})
        print(
            f"GP (SingleTaskGP, Matern-5/2) n={n:5d}: fit {fit_s:6.3f} s, predict {len(g)} designs {pred_s:.4f} s",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,100,200,400", help="ensemble training-set sizes")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=150, help="max epochs (early stopping applies)")
    ap.add_argument("--gp-sizes", default="50,100,200,400,600")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ensemble", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s)")
    gp_times(_ints(args.gp_sizes), args.seed)
    if not args.skip_ensemble:
        ensemble_times(_ints(args.sizes), args.members, args.epochs, args.seed)


if __name__ == "__main__":
    main()
