"""Backbone embeddings computed once per (backbone version, structure) and kept on disk.

Why on disk: featurising is the only slow step of a pretrained engine (CHGNet: ~80 crystals/s
on one core including graphs, ~4 min for the 18,928 CMR perovskites), while a head fits in well
under a second. So every embedding is computed once and reused by later rounds, resumed runs,
other campaigns over the same crystals, every ``sdl benchmark`` seed and ``sdl model evaluate``.

The store is one SQLite file (WAL, so several processes can read and write it), by default next
to the campaign's SQLite repository (``<db folder>/sdl-embeddings.sqlite``), else
``$SDL_EMBEDDING_CACHE`` or ``~/.cache/sdl/embeddings.sqlite``. A row is keyed by the backbone's
version string (model + weights digest) and the SHA-256 of the structure's text with line endings
and trailing blanks normalised: the same CIF or pymatgen JSON hits whatever campaign or file it
comes from, and nothing has to be parsed to find out (parsing 18,928 CIFs takes ~40 s). A crystal
written differently (another cell, other digits) is a different key and is featurised again.
Failed structures are stored with their reason, so a bad candidate is reported, not retried.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sdl.engine.models.backbones import Backbone, Featurization, load_backbone, nan_featurization

__all__ = ["EmbeddingStore", "default_store_path", "featurize_texts", "structure_key"]

logger = logging.getLogger(__name__)

STORE_ENV = "SDL_EMBEDDING_CACHE"
STORE_NAME = "sdl-embeddings.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings_v2 (
    backbone TEXT NOT NULL,
    structure_key TEXT NOT NULL,
    embedding BLOB,
    prior REAL,
    n_atoms INTEGER,
    error TEXT,
    PRIMARY KEY (backbone, structure_key)
) WITHOUT ROWID
"""


def structure_key(text: str) -> str:
    """SHA-256 of a structure's text with normalised line endings and no trailing blanks."""
    lines = [line.rstrip() for line in str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return hashlib.sha256("\n".join(line for line in lines if line).encode()).hexdigest()


def default_store_path(database_url: str | None = None) -> Path:
    """Where embeddings live: ``$SDL_EMBEDDING_CACHE``, else beside a SQLite repository, else ~/.cache/sdl."""
    from sdl.settings import settings

    configured = settings().embedding_cache
    if configured is not None:
        return configured.expanduser()
    if database_url and database_url.startswith("sqlite:///") and ":memory:" not in database_url:
        return Path(database_url[len("sqlite:///"):]).expanduser().resolve().parent / STORE_NAME
    return Path.home() / ".cache" / "sdl" / "embeddings.sqlite"


class StoredRow(NamedTuple):
    """One cached structure: its embedding (None if it failed), prior, atoms per cell and error."""

    embedding: np.ndarray | None
    prior: float
    n_atoms: float
    error: str | None


class EmbeddingStore:
    """SQLite file of embeddings keyed by ``(backbone version, structure key)``.

    Args:
        path: The SQLite file (created with its folder when missing).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(_SCHEMA)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0)
        con.execute("PRAGMA busy_timeout=60000")
        return con

    def get(self, backbone: str, keys: Sequence[str]) -> dict[str, StoredRow]:
        """Stored rows among ``keys``: key -> (embedding or None, prior, atoms per cell, error or None)."""
        out: dict[str, StoredRow] = {}
        wanted = list(dict.fromkeys(keys))
        with self._connect() as con:
            for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
                part = wanted[start : start + 900]
                marks = ",".join("?" * len(part))
                rows = con.execute(
                    f"SELECT structure_key, embedding, prior, n_atoms, error FROM embeddings_v2 "
                    f"WHERE backbone = ? AND structure_key IN ({marks})", [backbone, *part],
                ).fetchall()
                for key, blob, prior, atoms, error in rows:
                    emb = None if blob is None else np.frombuffer(blob, dtype=np.float32)
                    out[key] = StoredRow(emb, float("nan") if prior is None else float(prior),
                                         float("nan") if atoms is None else float(atoms), error)
        return out

    def put(self, backbone: str, keys: Sequence[str], feats: Featurization) -> None:
        """Store featurised rows (failed rows with their reason); existing rows are kept."""
        rows = []
        for i, key in enumerate(keys):
            error = feats.errors.get(i)
            blob = None if error is not None else np.ascontiguousarray(feats.embeddings[i], np.float32).tobytes()
            prior = None if error is not None else float(feats.prior[i])
            atoms = int(feats.n_atoms[i]) if np.isfinite(feats.n_atoms[i]) else None
            rows.append((backbone, key, blob, prior, atoms, error))
        with self._connect() as con:
            con.executemany("INSERT OR IGNORE INTO embeddings_v2 VALUES (?, ?, ?, ?, ?, ?)", rows)

    def count(self, backbone: str | None = None) -> int:
        """Rows stored (for one backbone version, or all)."""
        with self._connect() as con:
            if backbone is None:
                return int(con.execute("SELECT COUNT(*) FROM embeddings_v2").fetchone()[0])
            return int(con.execute("SELECT COUNT(*) FROM embeddings_v2 WHERE backbone = ?",
                                   [backbone]).fetchone()[0])


# -- featurising ---------------------------------------------------------------------------------

_WORKER_BACKBONES: dict[str, Backbone] = {}  # per worker process (pool or Dask worker): spec -> loaded
_WORKER_LOCK = threading.Lock()


def _worker_init(name: str) -> None:
    import torch

    torch.set_num_threads(1)
    _worker_backbone(name)


def _worker_backbone(spec: str) -> Backbone:
    """The backbone ``spec`` loaded once per process (Dask threads of one worker share it)."""
    with _WORKER_LOCK:
        if spec not in _WORKER_BACKBONES:
            _WORKER_BACKBONES[spec] = load_backbone(spec)
        return _WORKER_BACKBONES[spec]


def _featurize_chunk(args: tuple[Sequence[str], str, str]) -> Featurization:
    """One work item in a worker process: ``(texts, format, backbone spec)``."""
    texts, fmt, spec = args
    return _featurize_with(_worker_backbone(spec), texts, fmt, None)


def _featurize_with(
    backbone: Backbone, texts: Sequence[str], fmt: str, progress: Callable[[int], None] | None
) -> Featurization:
    from sdl.engine.space import parse_structure

    structures, rows, errors = [], [], {}
    for i, text in enumerate(texts):
        try:
            structures.append(parse_structure(text, fmt))
            rows.append(i)
        except ValueError as exc:
            errors[i] = str(exc)
    feats = backbone.featurize(structures, progress=progress)
    out = nan_featurization(len(texts), backbone.dim)
    out.embeddings[rows] = feats.embeddings
    out.prior[rows] = feats.prior
    out.n_atoms[rows] = [len(s) for s in structures]
    out.errors = {**errors, **{rows[j]: msg for j, msg in feats.errors.items()}}
    if progress is not None and errors:
        progress(len(errors))
    return out


def featurize_texts(
    backbone: Backbone,
    texts: Sequence[str],
    store: EmbeddingStore | None = None,
    *,
    fmt: str = "cif",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 256,
    spec: str | None = None,
    executor: Executor | None = None,
) -> Featurization:
    """Featurise structure texts (CIF or pymatgen JSON), reading and filling the store.

    Args:
        backbone: The loaded backbone (its ``version`` keys the store).
        texts: One structure text per row.
        store: Embedding store; None computes everything in memory.
        fmt: ``cif`` or ``pymatgen-json``.
        workers: Processes for the rows the store lacks (each loads the backbone once, one torch
            thread each); 1 featurises in this process.
        progress: ``(done, total)`` callback for the rows that need computing.
        chunk: Rows per work item.
        spec: What worker processes pass to :func:`load_backbone` (a YAML name or ``module:Class``);
            the backbone's ``name`` when None.
        executor: Run the chunks there instead (a Dask cluster's executor,
            :meth:`sdl.engine.distributed.DaskCompute.executor`); ``workers`` is then ignored. Each
            worker process loads the backbone once.

    Returns:
        A :class:`Featurization` in the order of ``texts``; unparsable or unfeaturisable rows are
        in ``errors`` (with the parse or backbone message) and NaN in the arrays.
    """
    t0 = time.perf_counter()
    keys = [structure_key(t) for t in texts]
    out = nan_featurization(len(texts), backbone.dim)
    stored = store.get(backbone.version, keys) if store is not None else {}
    missing: list[int] = []
    for i, key in enumerate(keys):
        row = stored.get(key)
        if row is None:
            missing.append(i)
        elif row.error is not None:
            out.errors[i] = row.error
        else:
            out.embeddings[i] = row.embedding
            out.prior[i] = row.prior
            out.n_atoms[i] = row.n_atoms
    # Equal texts featurise once.
    first: dict[str, int] = {}
    to_compute = [i for i in missing if first.setdefault(keys[i], i) == i]
    if store is not None:
        store.hits += len(texts) - len(missing)
        store.misses += len(to_compute)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, len(to_compute))

    if to_compute:
        logger.info("featurising %d structures with %s (%d cached, %s)", len(to_compute), backbone.version,
                    len(texts) - len(missing), "on the Dask cluster" if executor is not None else f"{workers} workers")
        parts = [to_compute[s : s + chunk] for s in range(0, len(to_compute), chunk)]
        items = [([texts[i] for i in p], fmt, spec or backbone.name) for p in parts]
        if executor is not None:
            for p, res in zip(parts, executor.map(_featurize_chunk, items), strict=True):
                _merge(out, p, res, store, backbone.version, keys)
                tick(len(p))
        elif workers > 1 and len(parts) > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(spec or backbone.name,)) as pool:
                for p, res in zip(parts, pool.map(_featurize_chunk, items), strict=True):
                    _merge(out, p, res, store, backbone.version, keys)
                    tick(len(p))
        else:
            for p in parts:
                res = _featurize_with(backbone, [texts[i] for i in p], fmt, None)
                _merge(out, p, res, store, backbone.version, keys)
                tick(len(p))
    for i in missing:  # duplicates of a text featurised above
        j = first[keys[i]]
        if j != i:
            out.embeddings[i], out.prior[i], out.n_atoms[i] = out.embeddings[j], out.prior[j], out.n_atoms[j]
            if j in out.errors:
                out.errors[i] = out.errors[j]
    logger.info("features for %d structures in %.1f s (%d computed, %d failed)", len(texts),
                time.perf_counter() - t0, len(to_compute), len(out.errors))
    return out


def _merge(out: Featurization, rows: list[int], res: Featurization, store: EmbeddingStore | None,
           version: str, keys: list[str]) -> None:
    out.embeddings[rows] = res.embeddings
    out.prior[rows] = res.prior
    out.n_atoms[rows] = res.n_atoms
    for j, msg in res.errors.items():
        out.errors[rows[j]] = msg
    if store is not None:
        store.put(version, [keys[i] for i in rows], res)
