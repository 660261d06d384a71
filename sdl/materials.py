"""Canonical material keys: one string per material, so the repository de-duplicates across campaigns.

A crystal measured by two campaigns (or proposed from two candidate files that chose a different
unit cell, origin or atom order) must land on one ``materials`` row; process-parameter recipes
likewise must not differ by float noise or key order.

Structure keys and their limits:

* key = ``struct:<reduced formula>:sg<number>:<16 hex digits>``; the digest covers the rounded
  lattice parameters of the Niggli-reduced *primitive standard* cell (spglib via pymatgen's
  ``SpacegroupAnalyzer``, ``symprec=0.01`` Å) and, per site, its species and the sorted rounded
  distances to its :data:`N_NEIGHBOURS` nearest neighbours, as a sorted multiset.
* Invariant to: choice of (super/sub-)cell, origin shift, atom order, rotation of the axes.
* Not invariant to: strain larger than the rounding (lengths to 10⁻³ Å, angles to 0.1°,
  distances to 10⁻² Å): two relaxations of one compound differing by more are two materials;
  values that sit exactly on a rounding boundary may round differently after a cell transform
  (float noise ~10⁻¹² Å); symmetry found within ``symprec`` (a slightly distorted structure may
  get a higher space group); enantiomorphs (mirror-image crystals) share a key; homometric
  structures (same distance sets, different arrangement; rare) share a key; partial occupancies
  are keyed by the species string of the site.

Identity of crystals is decided by pymatgen's ``StructureMatcher`` (:func:`same_structure`,
tolerances in :data:`MATCHER_TOLERANCES`), not by the key: the repository compares a new crystal
with the stored ones of the same reduced formula and uses the key only to name the row. So the
key's rounding limits above never split or merge materials in the repository.

Parameter keys: ``params:`` + canonical JSON (sorted keys, no spaces) with floats rounded to
:data:`PARAM_SIGNIFICANT_DIGITS` significant digits and integral floats written as integers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

__all__ = [
    "canonical_key",
    "canonical_params",
    "same_structure",
    "structure_matcher",
    "MATCHER_TOLERANCES",
    "N_NEIGHBOURS",
    "PARAM_SIGNIFICANT_DIGITS",
]

N_NEIGHBOURS = 12
PARAM_SIGNIFICANT_DIGITS = 10
SYMPREC = 0.01
MATCHER_TOLERANCES: tuple[float, float, float] = (0.2, 0.3, 5.0)
"""``(ltol, stol, angle_tol)``: pymatgen's default ``StructureMatcher`` tolerances (fractional
length, site, degrees), stated here so that a pymatgen upgrade cannot silently change which
crystals are one material."""


def _round_sig(x: float, digits: int = PARAM_SIGNIFICANT_DIGITS) -> float | int:
    if not math.isfinite(x):
        raise ValueError(f"parameter value {x!r} is not finite")
    if x == 0:
        return 0
    rounded = round(x, digits - 1 - math.floor(math.log10(abs(x))))
    return int(rounded) if float(rounded).is_integer() and abs(rounded) < 2**53 else rounded


def _canonical_value(value: Any, path: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        try:
            return _round_sig(value)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    if isinstance(value, Mapping):
        return {str(k): _canonical_value(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return _canonical_value(item(), path)
    raise ValueError(f"{path}: value {value!r} of type {type(value).__name__} has no canonical form")


def canonical_params(params: Mapping[str, Any]) -> str:
    """Canonical JSON of a parameter dict: sorted keys, rounded floats, ``1.0`` written as ``1``."""
    return json.dumps(_canonical_value(dict(params), "params"), sort_keys=True, separators=(",", ":"))


def _as_structure(structure: Any) -> Any:
    from pymatgen.core import Structure

    if isinstance(structure, Structure):
        return structure
    if isinstance(structure, Mapping):
        return Structure.from_dict(dict(structure))
    if isinstance(structure, str):
        return Structure.from_str(structure, fmt="cif")
    raise ValueError(f"structure of type {type(structure).__name__} is not a Structure, pymatgen dict or CIF text")


def _structure_key(structure: Any) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    s = _as_structure(structure)
    formula = s.composition.reduced_formula
    try:
        analyzer = SpacegroupAnalyzer(s, symprec=SYMPREC)
        number = analyzer.get_space_group_number()
        primitive = analyzer.get_primitive_standard_structure()
    except Exception:  # noqa: BLE001 - spglib gives up on some odd cells: fall back to P1 + the given cell
        number = 1
        primitive = s.get_primitive_structure()
    reduced = primitive.get_reduced_structure("niggli")
    lat = reduced.lattice
    lengths = sorted(round(v, 3) for v in lat.abc)
    angles = sorted(round(v, 1) for v in lat.angles)
    n_neigh = min(N_NEIGHBOURS, max(1, 4 * len(reduced)))
    radius = max(lat.abc) * 1.5 + 3.0
    # Neighbour arrays, not Neighbor objects: the wide radius finds ~1,000 neighbours per site and
    # building an object for each was most of the cost of a key. Rounding is monotonic, so the
    # rounded n nearest are the n nearest rounded (the same key as before).
    centres, _, _, distances = reduced.get_neighbor_list(radius)
    sites = []
    for index, site in enumerate(reduced):
        nearest = np.sort(distances[centres == index])[:n_neigh]
        sites.append([site.species_string, [round(float(d), 2) for d in nearest]])
    sites.sort(key=lambda item: json.dumps(item))
    payload = json.dumps({"abc": lengths, "angles": angles, "sites": sites}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return f"struct:{formula}:sg{number}:{digest}"


def canonical_key(
    *,
    structure: Any | None = None,
    params: Mapping[str, Any] | None = None,
    formula: str | None = None,
) -> str:
    """One string per material, for de-duplication in the repository.

    Args:
        structure: A pymatgen ``Structure``, its ``as_dict()`` JSON, or CIF text.
        params: Process parameters (a recipe); combined with ``structure`` when both are given.
        formula: Used alone only when neither structure nor params is given (``formula:<reduced>``).

    Raises:
        ValueError: Nothing to key on, an unreadable structure, or a non-finite parameter.
    """
    parts: list[str] = []
    if structure is not None:
        parts.append(_structure_key(structure))
    if params is not None:
        parts.append("params:" + canonical_params(params))
    if not parts:
        if not formula:
            raise ValueError("canonical_key needs a structure, params or a formula")
        from pymatgen.core import Composition

        parts.append(f"formula:{Composition(formula).reduced_formula}")
    return "|".join(parts)


@functools.cache
def structure_matcher() -> StructureMatcher:
    """The one ``StructureMatcher`` that decides material identity (primitive cells, volume scaled)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    ltol, stol, angle_tol = MATCHER_TOLERANCES
    return StructureMatcher(
        ltol=ltol, stol=stol, angle_tol=angle_tol, primitive_cell=True, scale=True, attempt_supercell=False
    )


def same_structure(a: Structure, b: Structure) -> bool:
    """Whether two crystals are one material: invariant to cell choice, origin and site order.

    Volumes are scaled before comparing, so two relaxations of one compound are one material;
    different polymorphs (another arrangement or coordination) are not.
    """
    return bool(structure_matcher().fit(a, b))
