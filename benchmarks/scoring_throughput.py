"""Scoring throughput in crystals per second (prints figures; ``--json FILE`` writes them).

Default: the from-scratch ensemble, graph construction included. Usage: ``python
benchmarks/scoring_throughput.py [--data CSV] [--n 10000] [--members 5] [--threads 1]``. The
ensemble's weights do not change the cost, so it is trained for one epoch only; structures are the
real CMR perovskites, repeated under new keys (cache misses) to reach ``--n``.

``--backbone chgnet --workers 1,2 --pool 100000``: the pretrained engine on a Dask ``LocalCluster``
of 1 and 2 worker processes (one torch thread each), and in this process (0):

* featurising: ``--featurize-n`` crystals the cache lacks (real crystals with a new text each,
  see :mod:`large_pools`) through CHGNet on the workers, cluster start-up apart, each worker's
  CHGNet load included;
* scoring: mean and std of every candidate of a ``--pool`` pool (embeddings cached) by the GP head
  (64 labels, cached Cholesky) with the streamed 2,048-row shortlist, and the MLP heads' member
  predictions;
* the projection of both to 1,000,000 crystals at the measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from pymatgen.core import Structure

from sdl.engine.models.ensemble import GNNEnsemble

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "simulators" / "worlds" / "perovskites_2k.csv.gz"


def pretrained(args: argparse.Namespace) -> dict[str, object]:
    """Featurise and score on 0 (this process) and on ``--workers`` Dask workers; figures as a dict."""
    from types import SimpleNamespace as NS

    import numpy as np
    from large_pools import cached_pool, load_base, tiled_frame

    from sdl.engine import Engine, Observation
    from sdl.engine.distributed import DaskCompute, predict_members
    from sdl.engine.models.backbones import load_backbone
    from sdl.engine.models.embedding_store import EmbeddingStore, _worker_init, featurize_texts

    base = load_base(args.data if args.data != SHIPPED else None)
    backbone = load_backbone(args.backbone)
    store = EmbeddingStore(args.cache)
    workers = [int(w) for w in str(args.workers).split(",")]
    out: dict[str, object] = {"base": str(args.data), "base_crystals": len(base), "pool": args.pool,
                              "backbone": backbone.version, "cpus": os.cpu_count(), "workers": workers}
    pool, fill_s = cached_pool(base, args.pool, backbone, store)
    out["cache_fill_s"] = fill_s
    eng = Engine(objective=NS(goal="minimize"), model=NS(name="gnn-ensemble", options={"head": "gp"}),
                 acquisition=NS(function="qucb", batch_size=8), seed=0, pool=pool, embedding_store=store,
                 backbone=backbone, initial_design=NS(strategy="random", size=2))
    eng.prepare()
    y = pool.values("e_form")
    rows = np.random.default_rng(0).choice(len(base), 64, replace=False)
    eng.observe([Observation(pool.keys[int(i)], {}, float(y[int(i)])) for i in rows])
    eng.fit()
    gp_surrogate = eng.surrogate
    mlp = Engine(objective=NS(goal="minimize"), model=NS(name="gnn-ensemble", options={"head": "mlp"}),
                 acquisition=NS(function="qucb", batch_size=8), seed=0, pool=pool, embedding_store=store,
                 backbone=backbone, initial_design=NS(strategy="random", size=2))
    mlp.observe(eng.observations)
    mlp.fit()
    assert mlp.heads is not None and mlp.head_inputs is not None
    avail = np.setdiff1d(np.arange(len(pool)), rows)
    first_copy = 1000  # texts no cache has seen: every run featurises for real
    for w in workers:
        compute = DaskCompute(workers=w) if w else None
        t = time.perf_counter()
        if compute is not None:
            compute.connect()
        out[f"startup_s_{w}"] = time.perf_counter() - t
        if compute is not None:  # every worker loads CHGNet once; timed apart from the steady rate
            t = time.perf_counter()
            compute.client.run(_worker_init, args.backbone)
            out[f"worker_backbone_load_s_{w}"] = time.perf_counter() - t
        try:
            fresh = tiled_frame(base.iloc[: args.featurize_n], args.featurize_n, first_copy=first_copy + w)
            cold = EmbeddingStore(Path(args.cache).parent / f"cold-{w}-{os.getpid()}.sqlite")
            t = time.perf_counter()
            feats = featurize_texts(backbone, [str(x) for x in fresh["cif"]], cold, chunk=32,
                                    executor=compute.executor() if compute is not None else None)
            featurize_s = time.perf_counter() - t
            assert not feats.errors, list(feats.errors.items())[:3]
            cold.path.unlink()
            out[f"featurize_per_s_{w}"] = args.featurize_n / featurize_s
            gp_surrogate.compute = compute
            gp_surrogate.score_pool(avail[:1000], lambda m, s: m, 16)  # warm: the pool goes to the workers once
            gp_surrogate.forget_scores()  # time the scoring, not the kept scores of the same model
            t = time.perf_counter()
            scores = gp_surrogate.score_pool(avail, lambda m, s: -m + 2.0 ** 0.5 * s, 2048)
            out[f"gp_score_per_s_{w}"] = len(pool) / (time.perf_counter() - t)
            assert scores.shortlist.size == 2048
            predict_members(mlp.heads, mlp.head_inputs, compute)  # warm
            t = time.perf_counter()
            predict_members(mlp.heads, mlp.head_inputs, compute)
            out[f"mlp_score_per_s_{w}"] = len(pool) / (time.perf_counter() - t)
        finally:
            gp_surrogate.compute = None
            if compute is not None:
                compute.close()
        rate = float(out[f"featurize_per_s_{w}"])  # type: ignore[arg-type]
        score = float(out[f"gp_score_per_s_{w}"])  # type: ignore[arg-type]
        out[f"projected_1M_featurize_h_{w}"] = 1e6 / rate / 3600
        out[f"projected_1M_gp_score_s_{w}"] = 1e6 / score
        out[f"projected_{args.pool}_featurize_min_{w}"] = args.pool / rate / 60
        print(f"workers {w}: start {out[f'startup_s_{w}']:.1f} s; featurise {rate:.1f} crystals/s "
              f"(1M: {1e6 / rate / 3600:.1f} h); GP score {score:,.0f}/s (1M: {1e6 / score:.1f} s); "
              f"MLP score {float(out[f'mlp_score_per_s_{w}']):,.0f}/s", flush=True)  # type: ignore[arg-type]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=SHIPPED)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--backbone", default=None, help="chgnet: the pretrained engine on Dask workers (above).")
    parser.add_argument("--workers", default="0,1,2", help="With --backbone: 0 = this process, N = N Dask workers.")
    parser.add_argument("--pool", type=int, default=100_000, help="With --backbone: candidates scored.")
    parser.add_argument("--featurize-n", type=int, default=200, help="With --backbone: crystals featurised cold.")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sdl-bench" / "embeddings.sqlite")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here as JSON.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backbone is not None:
        out = pretrained(args)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), **out}, indent=2) + "\n")
        return

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
