"""Composition descriptors ("Magpie-lite") for the composition GP baseline on crystal pools.

Why: a GP needs a fixed-length vector per material; element-property statistics weighted by
atomic fraction (Ward et al. 2016's Magpie idea, here with the properties pymatgen ships) are the
standard cheap baseline that a crystal-graph network should beat. Computed with pymatgen only,
cached per element and per formula, so a tiled 10^5 pool of 2k formulas costs 2k evaluations.

Features, for each of Z, Pauling electronegativity, atomic radius, group, row, atomic mass and
Mendeleev number: fraction-weighted mean, weighted std, min, max; plus the number of elements and
the largest atomic fraction (30 columns).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

import numpy as np

__all__ = ["ELEMENT_PROPERTIES", "FEATURE_NAMES", "composition_features"]

logger = logging.getLogger(__name__)

ELEMENT_PROPERTIES = ("Z", "X", "atomic_radius", "group", "row", "atomic_mass", "mendeleev_no")
FEATURE_NAMES = (
    *(f"{p}_{s}" for p in ELEMENT_PROPERTIES for s in ("mean", "std", "min", "max")),
    "n_elements",
    "max_fraction",
)


@cache
def _element_vector(symbol: str) -> tuple[float, ...]:
    from pymatgen.core import Element

    el = Element(symbol)
    out = []
    for name in ELEMENT_PROPERTIES:
        try:
            v = getattr(el, name)
            v = float(v) if v is not None else math.nan
        except (AttributeError, TypeError, ValueError):
            v = math.nan
        out.append(v)
    return tuple(out)


@lru_cache(maxsize=200_000)
def _features_of(formula: str) -> tuple[float, ...]:
    from pymatgen.core import Composition

    try:
        comp = Composition(formula)
    except Exception as exc:
        raise ValueError(f"cannot parse formula {formula!r}: {exc}") from exc
    fr = comp.fractional_composition
    symbols = [getattr(el, "symbol", str(el)) for el in fr.elements]
    if not symbols:
        raise ValueError(f"cannot parse formula {formula!r}: empty composition")
    w = np.array([fr[s] for s in symbols], dtype=np.float64)
    try:
        P = np.array([_element_vector(s) for s in symbols], dtype=np.float64)  # [n_el, n_prop]
    except ValueError as exc:  # dummy species such as "Xx"
        raise ValueError(f"cannot parse formula {formula!r}: {exc}") from exc
    # Missing element data (e.g. no Pauling X for noble gases): fall back to the other elements' mean.
    col_mean = np.nanmean(np.where(np.isnan(P), np.nan, P), axis=0)
    P = np.where(np.isnan(P), np.nan_to_num(col_mean, nan=0.0), P)
    mean = w @ P
    std = np.sqrt(np.maximum(w @ (P - mean) ** 2, 0.0))
    feats = np.stack([mean, std, P.min(axis=0), P.max(axis=0)], axis=1).reshape(-1)
    return (*feats.tolist(), float(len(symbols)), float(w.max()))


def composition_features(formulas: Sequence[Any]) -> np.ndarray:
    """``[N, 30]`` float64 descriptors of formulas (strings or pymatgen Compositions).

    Raises:
        ValueError: Naming the formula that pymatgen cannot parse.
    """
    rows = [_features_of(f if isinstance(f, str) else str(getattr(f, "formula", f))) for f in formulas]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))
