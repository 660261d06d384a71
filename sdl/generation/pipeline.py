"""Generation end to end: substitute, de-duplicate, compute CHGNet energies, rank by hull distance and probability.

Order of work (and why):

1. Every parent with guessable oxidation states gives all its charge-balanced substitutions above
   the probability threshold (:mod:`sdl.generation.substitution`, milliseconds per parent).
2. In decreasing probability, substituted structures are built (volume rescaled by ionic radii)
   and kept unless ``StructureMatcher`` finds them among the known crystals or the kept ones
   (:mod:`sdl.generation.dedup`), until ``score_top`` unique candidates exist: CHGNet costs
   seconds per relaxation, so only the most probable candidates get an energy.
3. CHGNet energies (relaxed, or single point) for those, and for the known phases when the hull
   is on the CHGNet scale (:mod:`sdl.generation.relax`, :mod:`sdl.generation.hull`).
4. Ranked by energy above the hull (lowest first), ties by probability; candidates without an
   energy follow in probability order. The first ``n`` are the result.

Steps 2 and 3 run in ``workers`` processes (spawned, one BLAS/torch thread each).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sdl.generation.dedup import KnownStructures
from sdl.generation.hull import ConvexHull, ElementCorrection
from sdl.generation.relax import CHGNetEnergies, Energy
from sdl.generation.substitution import (
    DEFAULT_THRESHOLD,
    OxidationStateError,
    Substitution,
    apply_substitution,
    decorate,
    substitutions_from,
)

if TYPE_CHECKING:
    import pandas as pd
    from pymatgen.core import Structure

    from sdl.generation.sources import KnownTable

__all__ = [
    "CANDIDATE_COLUMNS",
    "Candidate",
    "EnergyMode",
    "GenerationOptions",
    "GenerationResult",
    "Progress",
    "candidate_id",
    "generate",
]

logger = logging.getLogger(__name__)

EnergyMode = Literal["relax", "static", "none"]
Progress = Callable[[str, int, int], None]
"""``(stage, advance, total)``: called as work on a stage ends (``substitute``, ``build``, ``energy``, ``known``)."""

CANDIDATE_COLUMNS = [
    "id", "formula", "cif", "e_above_hull", "energy_per_atom", "substitution_probability",
    "parent_id", "substitution", "relax_steps",
]
"""Columns of the candidates CSV (a campaign reads ``id``, ``formula`` and ``cif``; the rest is provenance)."""

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate and how much CHGNet work to spend.

    Args:
        n: Candidates wanted.
        energy: ``relax`` (CHGNet ``StructOptimizer``, then the energy), ``static`` (one CHGNet
            energy of the volume-rescaled substituted cell) or ``none`` (rank by probability only).
        score_top: Unique candidates, most probable first, that get an energy (default ``2 * n``).
        threshold: Lowest substitution probability considered (pymatgen's default 1e-3).
        relax_steps: Most optimiser steps per relaxation.
        fmax: Force threshold of a relaxation (eV/Å).
        rescale: Rescale the volume of each substituted cell by the ionic radii before scoring.
        workers: Processes for building and scoring (1: in this process).
    """

    n: int
    energy: EnergyMode = "relax"
    score_top: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    relax_steps: int = 200
    fmax: float = 0.1
    rescale: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n=}")
        if self.energy not in ("relax", "static", "none"):
            raise ValueError(f"energy must be relax, static or none, got {self.energy=}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold=}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers=}")

    @property
    def n_scored(self) -> int:
        """How many of the most probable unique candidates get an energy."""
        return max(self.n, self.score_top if self.score_top is not None else 2 * self.n)


@dataclass
class Candidate:
    """One generated crystal.

    Args:
        id: Stable id (:func:`candidate_id`).
        substitution: Parent, species mapping, probability, formula.
        structure: The (relaxed) structure.
        energy_per_atom: CHGNet energy per atom on the hull's scale (NaN when not scored).
        e_above_hull: eV/atom above the known phases' hull (negative below it; NaN when not scored).
        relax_steps: Optimiser steps (0: not relaxed).
    """

    id: str
    substitution: Substitution
    structure: Structure
    energy_per_atom: float = math.nan
    e_above_hull: float = math.nan
    relax_steps: int = 0

    def row(self) -> dict[str, object]:
        """The candidates-CSV row."""
        return {
            "id": self.id, "formula": self.substitution.formula, "cif": self.structure.to(fmt="cif"),
            "e_above_hull": self.e_above_hull, "energy_per_atom": self.energy_per_atom,
            "substitution_probability": self.substitution.probability,
            "parent_id": self.substitution.parent_id, "substitution": self.substitution.label,
            "relax_steps": self.relax_steps,
        }


@dataclass
class GenerationResult:
    """Ranked candidates and what happened on the way.

    Args:
        candidates: Best first, at most ``n``.
        skipped: Input row id -> why it gave nothing (CIF unreadable, no oxidation states).
        n_substitutions: Substitutions enumerated above the threshold.
        n_unique: Unique new structures built (stops at ``score_top`` when there are more).
        n_scored: Candidates that got a CHGNet energy.
        wanted: The ``n`` asked for.
        hull_scale: ``chgnet``, ``table`` or ``none`` (see :mod:`sdl.generation.hull`).
        seconds: Wall time.
        exhausted: True when every substitution was built (so no more candidates exist).
        stage_seconds: Wall time per stage (``substitute``, ``build``, ``energy``, ``known``, ``hull``).
    """

    candidates: list[Candidate]
    skipped: dict[str, str] = field(default_factory=dict)
    n_substitutions: int = 0
    n_unique: int = 0
    n_scored: int = 0
    wanted: int = 0
    hull_scale: str = "none"
    seconds: float = 0.0
    exhausted: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def shortfall(self) -> str | None:
        """A sentence when fewer than ``n`` candidates exist, else None."""
        if len(self.candidates) >= self.wanted:
            return None
        return (f"only {len(self.candidates)} unique candidates could be generated (asked for {self.wanted}); "
                f"wrote what exists")

    def frame(self) -> pd.DataFrame:
        """The candidates as a table in :data:`CANDIDATE_COLUMNS` order."""
        import pandas as pd

        return pd.DataFrame([c.row() for c in self.candidates], columns=CANDIDATE_COLUMNS)

    def write_csv(self, path: str | Path) -> None:
        """Write the candidates CSV (gzipped when the name ends in ``.gz``); atomically."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        self.frame().to_csv(tmp, index=False, compression="gzip" if p.name.endswith(".gz") else None)
        os.replace(tmp, p)


def candidate_id(substitution: Substitution) -> str:
    """``gen-<12 hex>`` from the parent id and the mapping: the same substitution always gets the same id."""
    text = f"{substitution.parent_id}|{substitution.label}"
    return "gen-" + hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- worker processes

_ENERGIES: CHGNetEnergies | None = None


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    logging.getLogger("sdl").setLevel(logging.WARNING)


def _energies(fmax: float, steps: int) -> CHGNetEnergies:
    global _ENERGIES
    if _ENERGIES is None:
        _ENERGIES = CHGNetEnergies(fmax=fmax, steps=steps)
    _ENERGIES.fmax, _ENERGIES.steps = fmax, steps
    return _ENERGIES


def _build_chunk(args: tuple[list[tuple[Structure, Substitution]], bool]) -> list[Structure]:
    items, rescale = args
    return [apply_substitution(parent, sub, rescale=rescale) for parent, sub in items]


def _static_chunk(args: tuple[list[Structure], float, int]) -> list[Energy]:
    structures, fmax, steps = args
    return _energies(fmax, steps).static(structures)


def _relax_chunk(args: tuple[list[Structure], float, int]) -> list[Energy]:
    structures, fmax, steps = args
    engine = _energies(fmax, steps)
    return [engine.relax(s) for s in structures]


class _Runner:
    """Maps chunks over worker processes (or inline), reporting progress per finished chunk."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        if self.workers > 1:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=get_context("spawn"), initializer=_init_worker
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[[tuple[Any, ...]], list[R]], items: Sequence[T], extra: tuple[object, ...], chunk: int,
            progress: Callable[[int], None] | None = None) -> list[R]:
        chunks = [list(items[i:i + chunk]) for i in range(0, len(items), chunk)]
        out: list[R] = []
        if self._executor is None:
            for c in chunks:
                out.extend(fn((c, *extra)))
                if progress is not None:
                    progress(len(c))
            return out
        futures = [self._executor.submit(fn, (c, *extra)) for c in chunks]
        for c, f in zip(chunks, futures, strict=True):
            out.extend(f.result())
            if progress is not None:
                progress(len(c))
        return out


# --------------------------------------------------------------------------- the pipeline


def generate(
    parents: KnownTable,
    options: GenerationOptions,
    *,
    reference: KnownTable | None = None,
    progress: Progress | None = None,
) -> GenerationResult:
    """Generate, de-duplicate, score and rank candidates from the parents' structures.

    Args:
        parents: The known crystals to substitute into (they are also known phases and duplicates).
        options: How many, and how much CHGNet work.
        reference: More known phases for the hull and the duplicate check (e.g. a larger table).
        progress: Called per finished piece of work (see :data:`Progress`).

    Returns:
        The ranked result; fewer than ``n`` candidates when no more exist (see ``shortfall``).
    """
    t0 = time.perf_counter()

    def tick(stage: str, total: int) -> Callable[[int], None]:
        return lambda k: progress(stage, k, total) if progress is not None else None

    skipped = dict(parents.skipped)
    stages: dict[str, float] = {}
    subs: list[tuple[Structure, Substitution]] = []
    step = tick("substitute", len(parents))
    for pid, structure in zip(parents.ids, parents.structures, strict=True):
        try:
            decorated = decorate(structure)
            subs.extend((decorated, s) for s in substitutions_from(decorated, pid, options.threshold))
        except OxidationStateError as exc:
            skipped[pid] = str(exc)
        step(1)
    subs.sort(key=lambda item: (-item[1].probability, item[1].formula, item[1].parent_id, item[1].mapping))
    stages["substitute"] = time.perf_counter() - t0
    known_tables = [parents] + ([reference] if reference is not None else [])
    known = KnownStructures(s for t in known_tables for s in t.structures)
    limit = options.n_scored
    kept: list[Candidate] = []
    seen_ids: set[str] = set()
    position = 0
    with _Runner(options.workers) as runner:
        build = tick("build", min(limit, len(subs)))
        while len(kept) < limit and position < len(subs):
            window = subs[position:position + max(64, 2 * (limit - len(kept)))]
            position += len(window)
            structures = runner.map(_build_chunk, window, (options.rescale,), chunk=32)
            before = len(kept)
            for (_, sub), structure in zip(window, structures, strict=True):
                cid = candidate_id(sub)
                if cid in seen_ids or len(kept) >= limit:
                    continue
                if known.keep_if_new(structure):
                    seen_ids.add(cid)
                    kept.append(Candidate(cid, sub, structure))
            build(len(kept) - before)
        exhausted = position >= len(subs)
        stages["build"] = time.perf_counter() - t0 - stages["substitute"]
        scale = "none"
        if options.energy != "none" and kept:
            scale = _score(kept, known_tables, options, runner, tick, stages)
    kept.sort(key=_rank_key)
    result = GenerationResult(
        candidates=kept[: options.n], skipped=skipped, n_substitutions=len(subs), n_unique=len(kept),
        n_scored=sum(1 for c in kept if math.isfinite(c.energy_per_atom)), wanted=options.n,
        hull_scale=scale, seconds=time.perf_counter() - t0, exhausted=exhausted, stage_seconds=stages,
    )
    logger.info("generated %d candidates (%d substitutions, %d unique, %d scored) in %.1f s",
                len(result.candidates), result.n_substitutions, result.n_unique, result.n_scored, result.seconds)
    return result


def _rank_key(c: Candidate) -> tuple[int, float, float, str]:
    scored = math.isfinite(c.e_above_hull)
    return (0 if scored else 1, c.e_above_hull if scored else 0.0, -c.substitution.probability, c.id)


def _score(
    kept: list[Candidate],
    known_tables: list[KnownTable],
    options: GenerationOptions,
    runner: _Runner,
    tick: Callable[[str, int], Callable[[int], None]],
    stages: dict[str, float],
) -> str:
    """CHGNet energies for the kept candidates and the hull's known phases; fills ``e_above_hull``."""
    t = time.perf_counter()
    extra = (options.fmax, options.relax_steps)
    fn = _relax_chunk if options.energy == "relax" else _static_chunk
    energies = runner.map(fn, [c.structure for c in kept], extra, chunk=4 if options.energy == "relax" else 64,
                          progress=tick("energy", len(kept)))
    for c, e in zip(kept, energies, strict=True):
        c.structure, c.energy_per_atom, c.relax_steps = e.structure, e.energy_per_atom, e.steps
        if e.error:
            logger.info("candidate %s (%s) not scored: %s", c.id, c.substitution.formula, e.error)
    stages["energy"] = time.perf_counter() - t
    t = time.perf_counter()
    structures = [s for t in known_tables for s in t.structures]
    compositions = [s.composition for s in structures]
    on_table = all(t.energies is not None for t in known_tables)
    if on_table:
        table = [e for t in known_tables for e in (t.energies or [])]
    relevant = _relevant(compositions, kept) if not on_table else list(range(len(structures)))
    chgnet_known = runner.map(_static_chunk, [structures[i] for i in relevant], extra, chunk=64,
                              progress=tick("known", len(relevant)))
    known_chgnet = [e.energy_per_atom for e in chgnet_known]
    stages["known"] = time.perf_counter() - t
    t = time.perf_counter()
    if on_table:
        correction = ElementCorrection(compositions, known_chgnet, table)
        hull = ConvexHull(compositions, table)
        for c in kept:
            c.energy_per_atom = correction(c.structure.composition, c.energy_per_atom)
    else:
        hull = ConvexHull([compositions[i] for i in relevant], known_chgnet)
    for c in kept:
        c.e_above_hull = hull.e_above_hull(c.structure.composition, c.energy_per_atom)
    stages["hull"] = time.perf_counter() - t
    return "table" if on_table else "chgnet"


def _relevant(compositions: Sequence[object], kept: Sequence[Candidate]) -> list[int]:
    """Known phases inside some candidate's chemical system (the only ones its hull can use)."""
    from itertools import combinations

    systems: set[frozenset[str]] = set()
    for c in kept:
        els = sorted(el.symbol for el in c.structure.composition.elements)
        for k in range(2, len(els) + 1):
            systems.update(frozenset(x) for x in combinations(els, k))
    return [i for i, comp in enumerate(compositions)
            if frozenset(el.symbol for el in comp.elements) in systems]  # type: ignore[attr-defined]
