"""Powder XRD at the characterization station: did the synthesis make the target phase?

:mod:`sdl.xrd.patterns` (simulated sticks, strain, mixtures, broadened profiles, a pattern cache),
:mod:`sdl.xrd.phases` (the known phases that compete with a target: same composition, other
structure) and :mod:`sdl.xrd.phase_id` (search-match by cosine similarity and phase fractions by
non-negative least squares). Plain numpy/scipy/pymatgen: no torch, no Bluesky, callable alone.
"""

from __future__ import annotations

from sdl.xrd.patterns import CU_KA, TWO_THETA_RANGE, PatternCache, ProfileGrid, StickPattern, mix, simulate_pattern
from sdl.xrd.phase_id import UNIDENTIFIED, PhaseAnalysis, PhaseIdentifier, Reference, ReferenceLibrary
from sdl.xrd.phases import Phase, PhaseTable, PhaseTableError, parse_cif, reduced_formula

__all__ = [
    "PhaseIdentifier",
    "PhaseAnalysis",
    "Reference",
    "ReferenceLibrary",
    "UNIDENTIFIED",
    "Phase",
    "PhaseTable",
    "PhaseTableError",
    "reduced_formula",
    "parse_cif",
    "StickPattern",
    "ProfileGrid",
    "PatternCache",
    "simulate_pattern",
    "mix",
    "CU_KA",
    "TWO_THETA_RANGE",
]
