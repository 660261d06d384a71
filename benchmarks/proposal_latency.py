"""Proposal latency for q = 8 over 1k / 10k / 100k crystal candidates (GNN ensemble and composition GP).

How the pools are built: the CMR cubic-perovskite table
(``../shared/data/perovskites_cmr_mp_oqmd/cmr_castelli_perovskites.csv.gz``, 18,928 crystals) when
present, else the shipped ``simulators/worlds/perovskites_2k.csv.gz``; pools larger than the table
are the table tiled (copies get ids ``<id>~<copy>``; the same CIF text is parsed once, but every
copy gets its own crystal graph, so graph construction is measured at full size).

For each pool size and model, with 64 measured crystals (e_form, minimize) after the seeded
initial design, it prints:

* ``parse s``: CIF parsing of the pool's structures not parsed for a smaller size before.
* ``first``: the first model ``propose(q=8)``: fit + scoring every candidate (GNN: graph
  construction + M forward passes; GP: composition descriptors + posterior) + batch selection.
* ``again``: a second ``propose(q=8)`` with the first batch pending (no refit): the acquisition and
  selection alone (pre-filter to 2,048, then sequential greedy qUCB / qLogNEI).
* ``score/s``: ensemble scoring throughput with a cold graph cache on the first min(N, 5000)
  candidates, crystals per second, graph construction included (GNN only).

Usage: ``OMP_NUM_THREADS=2 python benchmarks/proposal_latency.py [--sizes 1000 10000 100000]
[--models gnn-ensemble gp] [--acquisition qucb] [--epochs 30] [--json FILE]``. Prints a table; not a test.

With ``--backbone chgnet`` it times the pretrained engine instead (GP head, 64 labels, q = 8) over
pools whose embeddings are cached (:mod:`large_pools`: real crystals tiled under new keys):
``read`` = :meth:`Engine.prepare` (hash every text, read every embedding back, standardise),
``first`` = the first model proposal (fit + score every candidate + shortlist + greedy batch),
``again`` = a second one with the first batch pending (same model: its pool scores are kept, so
the shortlist cut + greedy batch; ``select_s`` is that), ``after_measuring`` = a third one once the
first batch is measured (refit + rescore + select: the loop's steady state), ``fit`` and ``score`` = a refit and a
fresh scoring of every candidate, timed apart, and the process's peak RSS; ``--workers
0,2`` scores in this process and on a 2-worker Dask ``LocalCluster``. One size per process gives
the peak RSS of that size: ``python benchmarks/proposal_latency.py --backbone chgnet --pool 100000``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pandas as pd
import torch

from sdl.engine import Engine, Observation
from sdl.engine.distributed import DaskCompute
from sdl.engine.models.embedding_store import EmbeddingStore
from sdl.engine.space import CandidatePool

ROOT = Path(__file__).resolve().parent.parent
CMR = ROOT.parent / "shared" / "data" / "perovskites_cmr_mp_oqmd" / "cmr_castelli_perovskites.csv.gz"
SHIPPED = ROOT / "simulators" / "worlds" / "perovskites_2k.csv.gz"


def load_base() -> tuple[pd.DataFrame, str]:
    """The crystal table to tile, and where it came from."""
    if CMR.is_file():
        return pd.read_csv(CMR, usecols=["id", "formula", "e_form", "cif"]), str(CMR)
    return pd.read_csv(SHIPPED, usecols=["id", "formula", "e_form", "cif"]), str(SHIPPED)


_PARSED: dict = {}  # CIF text digest -> Structure, shared by the pools of every size


def make_pool(base: pd.DataFrame, n: int) -> CandidatePool:
    """First ``n`` rows of the table tiled as often as needed (parsed structures shared across sizes)."""
    copies = -(-n // len(base))
    frames = []
    for c in range(copies):
        f = base.copy()
        if c:
            f["id"] = f["id"].astype(str) + f"~{c}"
        frames.append(f)
    frame = pd.concat(frames, ignore_index=True).iloc[:n]
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula", source=f"tiled[{n}]")
    pool._parsed = _PARSED
    return pool


def run_one(pool: CandidatePool, model: str, acquisition: str, epochs: int, n_obs: int = 64) -> dict[str, float]:
    """Time two proposals on one pool."""
    truth = pool.values("e_form")
    options = {"backbone": "scratch", "members": 5, "hidden": 64, "layers": 3, "epochs": epochs, "patience": 10}
    eng = Engine(objective=NS(goal="minimize"), model=NS(name=model, options=options),
                 acquisition=NS(function=acquisition, batch_size=8, beta=2.0), seed=0, pool=pool,
                 initial_design=NS(strategy="random", size=n_obs))
    t = time.perf_counter()
    design = eng.propose(n_obs)
    eng.observe([Observation(p.key, p.params, float(truth[pool.index_of(p.key)])) for p in design])
    out: dict[str, float] = {"design_s": time.perf_counter() - t}
    t = time.perf_counter()
    first = eng.propose(8)
    out["first_s"] = time.perf_counter() - t
    t = time.perf_counter()
    eng.propose(8, pending=[p.key for p in first])
    out["again_s"] = time.perf_counter() - t
    if model == "gnn-ensemble":
        ens = eng._ensemble
        ens.converter.clear_cache()
        m = min(len(pool), 5000)
        structures = pool.structures(range(m))
        t = time.perf_counter()
        ens.predict_members(structures, pool.keys[:m], batch_size=1024)
        out["score_per_s"] = m / (time.perf_counter() - t)
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pretrained(base: pd.DataFrame, n: int, workers: int, acquisition: str, store: EmbeddingStore,
                   backbone: object, n_obs: int = 64) -> dict[str, float]:
    """Pretrained CHGNet engine (GP head) over a tiled pool with every embedding cached; two proposals."""
    from large_pools import cached_pool

    pool, fill_s = cached_pool(base, n, backbone, store)  # type: ignore[arg-type]
    truth = pool.values("e_form")
    compute = DaskCompute(workers=workers).connect() if workers else None
    try:
        eng = Engine(objective=NS(goal="minimize"), model=NS(name="gnn-ensemble", options={"head": "gp"}),
                     acquisition=NS(function=acquisition, batch_size=8, beta=2.0), seed=0, pool=pool,
                     initial_design=NS(strategy="random", size=n_obs), embedding_store=store, compute=compute,
                     backbone=backbone)  # type: ignore[arg-type]
        t = time.perf_counter()
        eng.prepare()
        out: dict[str, float] = {"cache_fill_s": fill_s, "cache_read_s": time.perf_counter() - t}
        design = eng.propose(n_obs)
        eng.observe([Observation(p.key, p.params, float(truth[pool.index_of(p.key)])) for p in design])
        t = time.perf_counter()
        first = eng.propose(8)
        out["first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        eng.propose(8, pending=[p.key for p in first])
        out["again_s"] = time.perf_counter() - t
        # the closed loop's steady state: the first batch measured, then a proposal (refit + rescore + select)
        eng.observe([Observation(p.key, p.params, float(truth[pool.index_of(p.key)])) for p in first])
        t = time.perf_counter()
        eng.propose(8)
        out["after_measuring_s"] = time.perf_counter() - t
        # the parts: a refit, and the scoring of every candidate with the streamed shortlist
        t = time.perf_counter()
        eng.surrogate.fit(eng._training_data())
        out["fit_s"] = time.perf_counter() - t
        avail = np.arange(len(pool))
        t = time.perf_counter()
        eng.surrogate.score_pool(avail, lambda m, s: -m + 2.0 ** 0.5 * s, eng.prefilter_k)
        out["score_s"] = time.perf_counter() - t
        out["select_s"] = out["again_s"]  # the same model's pool scores are kept: no scoring in "again"
    finally:
        if compute is not None:
            compute.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main() -> None:
    """Parse arguments, run every (size, model), print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", "--pool", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--models", nargs="+", default=["gnn-ensemble", "gp"])
    ap.add_argument("--acquisition", default="qucb")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--backbone", default="scratch", help="gnn-ensemble: scratch (CGCNN ensemble) or chgnet "
                    "(pretrained, GP head, embeddings cached first: see large_pools.py).")
    ap.add_argument("--workers", default="0", help="chgnet: comma list; 0 = in this process, N = a Dask "
                    "LocalCluster of N worker processes that scores the pool.")
    ap.add_argument("--data", type=Path, default=None, help="chgnet: crystal table to tile (default: shipped 2k).")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sdl-bench" / "embeddings.sqlite",
                    help="chgnet: embedding cache (the base crystals are featurised once into it).")
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here as JSON.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results: list[dict[str, object]] = []
    if args.backbone != "scratch":
        from large_pools import load_base as load_crystals

        from sdl.engine.models.backbones import load_backbone

        base = load_crystals(args.data)
        store = EmbeddingStore(args.cache)
        backbone = load_backbone(args.backbone)
        print(f"base table: {args.data or 'shipped 2k'} ({len(base)} crystals, tiled); backbone {backbone.version}; "
              f"torch threads: {torch.get_num_threads()}")
        print(f"{'N':>8} {'workers':>7} {'acq':>6} {'read s':>7} {'first s':>8} {'again s':>8} {'next s':>7} "
              f"{'fit s':>6} {'score s':>8} {'peak RSS MiB':>13}")
        for n in args.sizes:
            for w in [int(x) for x in str(args.workers).split(",")]:
                r = run_pretrained(base, n, w, args.acquisition, store, backbone)
                results.append({"n": n, "workers": w, "acquisition": args.acquisition, **r})
                print(f"{n:>8} {w:>7} {args.acquisition:>6} {r['cache_read_s']:7.2f} {r['first_s']:8.2f} "
                      f"{r['again_s']:8.2f} {r['after_measuring_s']:7.2f} {r['fit_s']:6.2f} {r['score_s']:8.2f} "
                      f"{r['peak_rss_mib']:13.0f}",
                      flush=True)
    else:
        base, source = load_base()
        print(f"base table: {source} ({len(base)} crystals); torch threads: {torch.get_num_threads()}")
        print(f"{'N':>8} {'model':>13} {'acq':>8} {'parse s':>8} {'first s':>8} {'again s':>8} {'score/s':>9}")
        for n in args.sizes:
            pool = make_pool(base, n)
            t = time.perf_counter()
            if "gnn-ensemble" in args.models:
                pool.structures()
            parse_s = time.perf_counter() - t
            for model in args.models:
                r = run_one(pool, model, args.acquisition, args.epochs)
                results.append({"n": n, "model": model, "acquisition": args.acquisition, "parse_s": parse_s, **r})
                score = f"{r['score_per_s']:9.0f}" if "score_per_s" in r else f"{'-':>9}"
                print(f"{n:>8} {model:>13} {args.acquisition:>8} {parse_s:8.1f} {r['first_s']:8.2f} "
                      f"{r['again_s']:8.2f} {score}", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "cpus": os.cpu_count(),
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
