"""Pretrained crystal engine: featurising speed, scoring speed from the cache, first-proposal latency.

Prints (or, with ``--json``, writes one JSON object of) these figures:

* ``featurize_per_s``: crystals featurised per second with a cold cache (CIF parsing, CHGNet graph,
  forward pass, cache write), in this process, and with ``--workers`` processes;
* ``cache_read_s``: :meth:`Engine.prepare` over the whole pool from a warm cache (keys, SQLite
  read, standardising), i.e. what a resumed campaign or a new campaign over known crystals pays;
* ``scored_per_s``: candidates scored per second with cached embeddings (posterior mean and std of
  every pool row) by the GP head and the MLP-ensemble head, ``--labels`` labels each;
* ``first_proposal_s``: a fresh engine over the pool, ``--labels`` labels, one ``propose(q)``:
  cache read + fit + scoring + batch selection (and the parts).

Usage::

    SDL_EMBEDDING_CACHE=/path/emb.sqlite python benchmarks/pretrained_throughput.py \
        --data ../shared/data/perovskites_cmr_mp_oqmd/cmr_castelli_perovskites.csv.gz [--json OUT]

The first run over a pool fills the cache (minutes for 18,928 crystals); figures are for the
second. Defaults to the shipped 2,000-crystal world when ``--data`` is not given.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pandas as pd
import torch

from sdl.engine import Engine, Observation
from sdl.engine.models.backbones import load_backbone
from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path, featurize_texts
from sdl.engine.space import CandidatePool

ROOT = Path(__file__).resolve().parents[1]


def engine(pool: CandidatePool, store: EmbeddingStore, head: str, extensive: bool, q: int) -> Engine:
    return Engine(objective=NS(goal="minimize", extensive=extensive),
                  model=NS(name="gnn-ensemble", options={"head": head, "members": 10}),
                  acquisition=NS(function="qucb", batch_size=q, beta=2.0), seed=0, pool=pool,
                  initial_design=NS(strategy="random", size=2), embedding_store=store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "simulators" / "worlds" / "perovskites_2k.csv.gz")
    parser.add_argument("--target", default="e_form")
    parser.add_argument("--extensive", action="store_true")
    parser.add_argument("--featurize-n", type=int, default=400, help="Crystals for the cold featurising figure.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--labels", type=int, default=64)
    parser.add_argument("--q", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=None, help="Warm cache (default: $SDL_EMBEDDING_CACHE ...).")
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here as JSON.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frame = pd.read_csv(args.data)
    texts = [str(t) for t in frame["cif"]]
    out: dict[str, object] = {"data": str(args.data), "pool": len(frame), "labels": args.labels, "q": args.q,
                              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}

    backbone = load_backbone("chgnet")
    out["backbone"] = backbone.version
    n = min(args.featurize_n, len(texts) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        cold = EmbeddingStore(Path(tmp) / "cold.sqlite")
        t = time.perf_counter()
        featurize_texts(backbone, texts[:n], cold)
        out["featurize_per_s_1_process"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        featurize_texts(backbone, texts[n : 2 * n], cold, workers=args.workers, chunk=max(1, n // (2 * args.workers)))
        out[f"featurize_per_s_{args.workers}_workers"] = n / (time.perf_counter() - t)  # includes worker start-up

    store = EmbeddingStore(args.cache if args.cache is not None else default_store_path())
    pool = CandidatePool.from_frame(frame, id_column="id" if "id" in frame else None, structure_column="cif",
                                    source=args.data.name)
    t = time.perf_counter()
    engine(pool, store, "gp", args.extensive, args.q).prepare()
    out["fill_or_read_cache_s"] = time.perf_counter() - t  # minutes on a cold cache, the read on a warm one
    y = frame[args.target].to_numpy(dtype=float)
    labelled = np.random.default_rng(0).choice(len(pool), size=args.labels, replace=False)
    for head in ("gp", "mlp"):
        eng = engine(pool, store, head, args.extensive, args.q)
        t0 = time.perf_counter()
        eng.prepare()
        t1 = time.perf_counter()
        eng.observe([Observation(pool.keys[int(i)], {}, float(y[int(i)])) for i in labelled])
        eng.fit()
        t2 = time.perf_counter()
        batch = eng.propose()
        t3 = time.perf_counter()
        assert len(batch) == args.q
        t3b = time.perf_counter()
        if eng.heads is not None:  # the members' predictions for every row, as a refit computes them
            assert eng.head_inputs is not None
            eng.heads.predict_members(eng.head_inputs)
        else:  # the GP posterior mean and std of every row
            eng.predict_pool()
        t4 = time.perf_counter()
        out[f"{head}_cache_read_s"] = t1 - t0
        out[f"{head}_fit_s"] = t2 - t1
        out[f"{head}_score_and_select_s"] = t3 - t2
        out[f"{head}_first_proposal_s"] = t3 - t0
        out[f"{head}_scored_per_s"] = len(pool) / (t4 - t3b)
    for key, value in out.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
