"""Large crystal pools for the scaling benchmarks: real crystals tiled under new keys and texts.

How a pool of ``N`` is built: the rows of a real table (the shipped 2,000 CMR perovskites
``simulators/worlds/perovskites_2k.csv.gz`` by default, or ``../shared/data/perovskites_cmr_mp_oqmd``'s
18,928) repeated as often as needed; copy ``c`` of a crystal gets the id ``<id>~<c>`` and its CIF
text a comment line ``# copy c``, so every candidate has its own embedding-cache key (a real
100k-row cache read), while its structure (and so its embedding) is that of the original. This is
a throughput benchmark, not a search problem: the copies make ties that a real pool would not have.

:func:`cached_pool` fills the embedding cache for such a pool from the originals' features (the
originals are featurised once with the real CHGNet and stay in the cache file between runs), so
"embeddings cached" is the state a campaign is in after its pool was featurised once.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from sdl.engine.models.backbones import Backbone
from sdl.engine.models.embedding_store import EmbeddingStore, featurize_texts, structure_key
from sdl.engine.space import CandidatePool

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "simulators" / "worlds" / "perovskites_2k.csv.gz"


def tiled_frame(base: pd.DataFrame, n: int, first_copy: int = 0) -> pd.DataFrame:
    """``n`` rows: ``base`` repeated, copies ``first_copy, first_copy + 1, ...`` with their own ids and texts."""
    frames = []
    copies = -(-n // len(base))
    for c in range(first_copy, first_copy + copies):
        f = base.copy()
        if c:
            f["id"] = f["id"].astype(str) + f"~{c}"
            f["cif"] = f["cif"].astype(str) + f"\n# copy {c}\n"
        frames.append(f)
    return pd.concat(frames, ignore_index=True).iloc[:n].reset_index(drop=True)


def cached_pool(base: pd.DataFrame, n: int, backbone: Backbone, store: EmbeddingStore) -> tuple[CandidatePool, float]:
    """A tiled pool of ``n`` whose every embedding is in ``store``; and the seconds spent filling it."""
    t = time.perf_counter()
    feats = featurize_texts(backbone, [str(x) for x in base["cif"]], store)  # computed once per cache file
    frame = tiled_frame(base, n)
    keys = [structure_key(x) for x in frame["cif"]]
    have = store.get(backbone.version, keys)
    missing = np.array([i for i, k in enumerate(keys) if k not in have], dtype=np.int64)
    if missing.size:
        src = missing % len(base)
        feats.errors = {j: feats.errors[int(s)] for j, s in enumerate(src) if int(s) in feats.errors}
        copied = type(feats)(feats.embeddings[src], feats.prior[src], feats.errors, feats.n_atoms[src])
        store.put(backbone.version, [keys[i] for i in missing], copied)
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula", source=f"tiled[{n}]")
    return pool, time.perf_counter() - t


def load_base(path: Path | None) -> pd.DataFrame:
    """The real crystal table to tile (id, formula, e_form, cif)."""
    return pd.read_csv(path or SHIPPED, usecols=["id", "formula", "e_form", "cif"])
