"""Warm start (``transfer:``): experiments saved on a second campaign over an overlapping pool.

Usage: ``python benchmarks/transfer.py [--data simulators/worlds/crossed_barrel.csv] [--seeds 5]
[--overlap 0.25] [--split random|COLUMN] [--source-budget 48] [--budget 120] [--initial 2]
[--batch-size 6] [--top-fraction 0.05] [--arms cold,warm[,warm-skip]] [--json FILE]``.

* The recorded table (crossed barrel: 600 designs x 3 real replicates) is split into two pools
  that share ``--overlap`` of the designs: a seeded random split, or by a parameter column (pool A
  the low side, pool B the high side, overlapping in the middle).
* Per seed, a first campaign (GP, qLogNEI, the engine's defaults) runs ``--source-budget``
  experiments over pool A; what it measured (real replicates) is the transfer source.
* A second campaign over pool B then runs the same engine cold, and warm-started from the first
  (``transfer:`` multi-task GP; ``warm-skip`` also never proposes a design the first one measured).
  Both start from the same seeded initial design; the source never counts as an experiment.
* Figure: experiments of the second campaign until it has measured half of pool B's top set
  (best ``--top-fraction`` by per-design mean, initial design included), median over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sdl import benchmark_metrics as bm
from sdl.benchmark import BenchmarkDataset, Strategy, default_engine_factory, load_table_dataset, replay
from sdl.engine.models.multitask import RelatedData

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "simulators" / "worlds" / "crossed_barrel.csv"
PARAMS = ["n", "theta", "r", "t"]
GP = Strategy(label="gp", model="gp", acquisition="qlognei")
EARLY = (12, 24, 48)  # experiments after which the top designs found so far are reported


def split_pools(df: pd.DataFrame, params: list[str], overlap: float, split: str, seed: int,
                out: Path) -> tuple[Path, Path, int]:
    """Write pool A and pool B (every replicate row of their designs) as CSVs; returns them and the overlap."""
    designs = df[params].drop_duplicates().reset_index(drop=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(designs))
    if split != "random":  # by a column: low side first, ties in seeded order
        order = np.lexsort((rng.permutation(len(designs)), designs[split].to_numpy()))
    n = len(designs)
    n_shared = round(overlap * n)
    n_a = (n + n_shared) // 2
    a, b = set(order[:n_a].tolist()), set(order[n_a - n_shared:].tolist())
    key = df[params].apply(tuple, axis=1)
    dkey = designs.apply(tuple, axis=1)
    paths = []
    for name, rows in (("pool_a", a), ("pool_b", b)):
        keep = set(dkey.iloc[sorted(rows)])
        p = out / f"{name}.csv"
        df[key.isin(keep)].to_csv(p, index=False)
        paths.append(p)
    return paths[0], paths[1], len(a & b)


def related_from(run_keys: list[str], measured: list[float], dataset: BenchmarkDataset) -> RelatedData:
    """The first campaign's measurements as the second one's related data (matched by recipe)."""
    index = {k: i for i, k in enumerate(dataset.ids)}
    return RelatedData.from_rows([("first", k, dataset.params[index[k]], v) for k, v in zip(run_keys, measured,
                                                                                             strict=True)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--target", default="toughness")
    ap.add_argument("--params", default=",".join(PARAMS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--split", default="random", help="'random' or a parameter column")
    ap.add_argument("--source-budget", type=int, default=48)
    ap.add_argument("--budget", type=int, default=120)
    ap.add_argument("--initial", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--top-fraction", type=float, default=0.05)
    ap.add_argument("--arms", default="cold,warm")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    params = args.params.split(",")
    arms = args.arms.split(",")
    df = pd.read_csv(args.data)
    work = Path(tempfile.mkdtemp(prefix="sdl-transfer-"))
    pa, pb, shared = split_pools(df, params, args.overlap, args.split, 0, work)
    ds_a = load_table_dataset(pa, args.target, "max", params, work_dir=work / "a")
    ds_b = load_table_dataset(pb, args.target, "max", params, work_dir=work / "b")
    top = bm.top_set(ds_b.truth, "max", args.top_fraction)
    m = int(top.size)
    in_a = {tuple(p.values()) for p in ds_a.params}
    top_in_a = sum(1 for i in top if tuple(ds_b.params[int(i)].values()) in in_a)
    print(f"{args.data.name}: pool A {ds_a.pool_size} designs, pool B {ds_b.pool_size}, shared {shared} "
          f"({args.split} split); B's top {args.top_fraction:g}: {m} designs, {top_in_a} of them in A")
    results: dict[str, Any] = {arm: {"experiments_to_half": [], "recall_at_budget": [], "recall": [], "wall_s": []}
                               for arm in arms}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        src = replay(ds_a, GP, seed + 1000, args.source_budget, initial=args.initial, batch_size=args.batch_size)
        related = related_from(src.keys, src.measured, ds_a)
        t_src = time.perf_counter() - t0
        line = [f"seed {seed}: source {len(src.keys)} experiments ({t_src:.0f} s)"]
        for arm in arms:
            def factory(ds: BenchmarkDataset, st: Strategy, sd: int, init: int, q: int, arm: str = arm,
                        related: RelatedData = related) -> Any:
                engine = default_engine_factory(ds, st, sd, init, q)
                if arm != "cold":
                    engine.add_related(related, skip_measured=arm == "warm-skip")
                return engine

            t1 = time.perf_counter()
            run = replay(ds_b, GP, seed, args.budget, initial=args.initial, batch_size=args.batch_size,
                         engine_factory=factory)
            curve = bm.recall_curve(run.indices, top)
            to_half = bm.experiments_to(curve, 0.5, m)
            results[arm]["experiments_to_half"].append(to_half)
            results[arm]["recall_at_budget"].append(float(curve[-1]))
            results[arm]["recall"].append([float(c) for c in curve])
            results[arm]["wall_s"].append(time.perf_counter() - t1)
            line.append(f"{arm} {to_half if to_half is not None else '>' + str(args.budget)}")
        print(", ".join(line), flush=True)
        write(args, ds_a, ds_b, shared, m, top_in_a, results, summarize(results, arms, seed + 1, args.budget, m,
                                                                       quiet=True))
    write(args, ds_a, ds_b, shared, m, top_in_a, results, summarize(results, arms, args.seeds, args.budget, m))


def summarize(results: dict[str, Any], arms: list[str], n_seeds: int, budget: int, n_top: int, *,
              quiet: bool = False) -> dict[str, Any]:
    """Median experiments to half of B's top set per arm (+ recall at the budget); printed unless ``quiet``."""
    summary = {}
    for arm in arms:
        st = bm.median_iqr(results[arm]["experiments_to_half"])
        summary[arm] = {"median_experiments_to_half": st, "reached": sum(v is not None for v in
                                                                         results[arm]["experiments_to_half"]),
                        "median_recall_at_budget": float(np.median(results[arm]["recall_at_budget"])),
                        "median_top_found_at": {str(k): float(np.median([round(c[k - 1] * n_top)
                                                                         for c in results[arm]["recall"]]))
                                                for k in EARLY if k <= budget}}
        if not quiet:
            early = ", ".join(f"{v:g} at {k}" for k, v in summary[arm]["median_top_found_at"].items())
            print(f"{arm:10s} experiments to half of B's top set: median {st.get('median')} (IQR {st.get('q25')}–"
                  f"{st.get('q75')}), reached in {summary[arm]['reached']}/{n_seeds}; recall at {budget}: "
                  f"{summary[arm]['median_recall_at_budget']:.2f}; top designs found (median): {early}")
    return summary


def write(args: argparse.Namespace, ds_a: BenchmarkDataset, ds_b: BenchmarkDataset, shared: int, m: int,
          top_in_a: int, results: dict[str, Any], summary: dict[str, Any]) -> None:
    """The ``--json`` file (rewritten after every seed, so a long run leaves its seeds so far)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "data": str(args.data), "pool_a": ds_a.pool_size, "pool_b": ds_b.pool_size, "shared": shared,
            "split": args.split, "overlap": args.overlap, "source_budget": args.source_budget, "budget": args.budget,
            "initial": args.initial, "batch_size": args.batch_size, "top_fraction": args.top_fraction, "n_top": m,
            "top_in_a": top_in_a, "seeds": list(range(len(results[next(iter(results))]["recall"]))),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "runs": results, "summary": summary,
        }, indent=2))


if __name__ == "__main__":
    main()
