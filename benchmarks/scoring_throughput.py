"""Ensemble scoring throughput in crystals per second, graph construction included (prints figures).

Usage: ``python benchmarks/scoring_throughput.py [--data CSV] [--n 10000] [--members 5] [--threads 1]``.
The ensemble's weights do not change the cost, so it is trained for one epoch only; structures
are the real CMR perovskites, repeated under new keys (cache misses) to reach ``--n``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from pymatgen.core import Structure

from sdl.engine.models.ensemble import GNNEnsemble

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT / "simulators" / "worlds" / "perovskites_2k.csv.gz")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    df = pd.read_csv(args.data)
    t = time.perf_counter()
    base = [Structure.from_str(c, fmt="cif") for c in df["cif"]]
    parse_s = time.perf_counter() - t
    structures = [base[i % len(base)] for i in range(args.n)]
    keys = [f"c{i}" for i in range(args.n)]
    ens = GNNEnsemble({"members": args.members, "hidden": args.hidden, "epochs": 1}, seed=0)
    ens.fit(base[:256], df["e_form"].to_numpy()[:256])
    ens.converter.clear_cache()

    t = time.perf_counter()
    ens.graphs(structures, keys)
    graph_s = time.perf_counter() - t
    t = time.perf_counter()
    preds = ens.predict_members(structures, keys, batch_size=args.batch_size)
    cached_s = time.perf_counter() - t
    print(f"data: {args.data.name}, {len(base)} real crystals repeated to {args.n} keys; "
          f"{args.members} members, hidden {args.hidden}, {torch.get_num_threads()} thread(s)")
    print(f"CIF parsing (not part of scoring):   {len(base) / parse_s:10.0f} crystals/s")
    print(f"graph construction:                  {args.n / graph_s:10.0f} crystals/s ({graph_s:.2f} s)")
    print(f"ensemble forward, graphs cached:     {args.n / cached_s:10.0f} crystals/s ({cached_s:.2f} s)")
    print(f"scoring incl. graph construction:    {args.n / (graph_s + cached_s):10.0f} crystals/s "
          f"({graph_s + cached_s:.2f} s), output {tuple(preds.shape)}")


if __name__ == "__main__":
    main()
