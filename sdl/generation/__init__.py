"""Candidate generation: ionic substitution into known crystals, de-duplication, CHGNet relaxation, hull ranking.

The stages are one module each and plain functions, callable without the CLI:
:mod:`~sdl.generation.substitution` (pymatgen's data-mined substitution probabilities),
:mod:`~sdl.generation.dedup` (``StructureMatcher`` against the known crystals and each other),
:mod:`~sdl.generation.relax` (CHGNet energies, optionally after its ``StructOptimizer``),
:mod:`~sdl.generation.hull` (energy above the convex hull of the known phases),
:mod:`~sdl.generation.pipeline` (the stages in order, with worker processes) and
:mod:`~sdl.generation.growth` (a campaign's pool grown between rounds).
"""

from __future__ import annotations

__all__ = ["GenerationError"]


class GenerationError(ValueError):
    """Bad input to candidate generation (a missing file or column); the message names it."""
