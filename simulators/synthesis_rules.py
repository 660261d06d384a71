"""Synthesis failures by a chemical rule: Goldschmidt's tolerance factor of an ABX3 perovskite.

Why a rule and not a rate: real syntheses fail in regions of composition space, not at random, and
a feasibility model can only learn a region. Goldschmidt's rule (1926) is the oldest such region
for perovskites: the A cation must fit the cuboctahedral cage of the BX6 octahedra,

    t = (r_A + r_X) / (sqrt(2) (r_B + r_X)),

with Shannon's ionic radii (A twelve-fold, B and X six-fold coordinated; pymatgen's tables). A
perovskite forms for t in about [0.8, 1.07] (CaTiO3 0.97, SrTiO3 1.00, BaTiO3 1.06); smaller t
gives ilmenite-like or non-perovskite structures, larger t hexagonal stackings (BaNiO3 1.13). The
simulated robot fails a synthesis whose target lies outside the window.

Oxidation states: the anions keep their usual charge (O2-, N3-, F-, S2-, Cl-, Br-, I-, Se2-); the
cations take every charge-balanced assignment of their known oxidation states
(``Composition.oxi_state_guesses(all_oxi_states=True)``), and the most favourable ``t`` counts (the
compound picks its oxidation states). Sites: the cation nearer to the anions (the octahedral site)
is B; this needs the crystal structure. A composition without any charge-balanced assignment that
has Shannon radii is *unjudged*: ``unjudged`` says whether it fails (no ionic ABX3 exists) or is
left to the recorded data. Results are cached per (A, B, anions).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["ANION_CHARGES", "ToleranceFactorRule", "Verdict", "shannon_radius"]

logger = logging.getLogger(__name__)

ANION_CHARGES: dict[str, int] = {"O": -2, "N": -3, "F": -1, "S": -2, "Cl": -1, "Br": -1, "I": -1, "Se": -2}
"""Charges the anions of an ABX3 perovskite are held at."""
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10,
          "XI": 11, "XII": 12, "XIV": 14}
Unjudged = Literal["succeed", "fail"]


def shannon_radius(element: str, charge: int, coordination: str) -> float | None:
    """Shannon's ionic radius (Å) of ``element`` at ``charge``; the nearest tabulated coordination
    (higher first on a tie) when ``coordination`` itself is not tabulated; None without any."""
    from pymatgen.core import Element

    table = Element(element).data.get("Shannon radii", {}).get(str(int(charge)))
    if not table:
        return None
    want = _ROMAN[coordination]
    best = min(table, key=lambda cn: (abs(_ROMAN.get(cn, 99) - want), -_ROMAN.get(cn, 0)))
    spins = table[best]
    entry = spins.get("") or next(iter(spins.values()))
    return float(entry["ionic_radius"])


@dataclass(frozen=True)
class Verdict:
    """What the rule says about one candidate.

    Attributes:
        ok: The synthesis succeeds.
        t: The tolerance factor (None when unjudged).
        reason: Why it fails (None when it succeeds).
    """

    ok: bool
    t: float | None
    reason: str | None = None


class ToleranceFactorRule:
    """Fail the synthesis of an ABX3 perovskite whose tolerance factor lies outside ``[low, high]``.

    Args:
        low: Smallest tolerance factor that forms a perovskite.
        high: Largest tolerance factor that forms a perovskite.
        unjudged: What happens to a candidate without a charge-balanced assignment with radii:
            ``succeed`` (left to the recorded data) or ``fail``.
    """

    def __init__(self, low: float = 0.8, high: float = 1.07, unjudged: Unjudged = "succeed") -> None:
        if not 0.0 < low < high:
            raise ValueError(f"tolerance factor window must satisfy 0 < low < high, got [{low}, {high}]")
        if unjudged not in ("succeed", "fail"):
            raise ValueError(f"unjudged must be 'succeed' or 'fail', got {unjudged!r}")
        self.low, self.high, self.unjudged = float(low), float(high), unjudged
        self._cache: dict[tuple[str, str, tuple[tuple[str, float], ...]], Verdict] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ToleranceFactorRule(low={self.low}, high={self.high}, unjudged={self.unjudged!r})"

    def judge(self, structure: Structure) -> Verdict:
        """The verdict for one crystal (A and B sites from its structure)."""
        a, b, anions = _sites(structure)
        key = (a, b, tuple(sorted(anions.items())))
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._judge(a, b, anions)
            with self._lock:
                self._cache[key] = cached
        return cached

    def judge_cif(self, cif: str) -> Verdict:
        """:meth:`judge` of a CIF text."""
        import warnings

        from pymatgen.core import Structure

        with warnings.catch_warnings():  # "fractional coordinates rounded": harmless for the sites
            warnings.simplefilter("ignore")
            structure = Structure.from_str(cif, fmt="cif")
        return self.judge(structure)

    def tolerance_factors(self, a: str, b: str, anions: dict[str, float]) -> list[float]:
        """``t`` of every charge-balanced assignment with radii (most probable first)."""
        from pymatgen.core import Composition

        comp = Composition({a: 1, b: 1, **anions})
        total = sum(anions.values())
        r_x = sum(n * (shannon_radius(x, ANION_CHARGES[x], "VI") or math.nan) for x, n in anions.items()) / total
        if math.isnan(r_x):
            return []
        guesses = comp.oxi_state_guesses(oxi_states_override={x: [ANION_CHARGES[x]] for x in anions},
                                         all_oxi_states=True, max_sites=-1)
        out = []
        for g in guesses:
            if a == b or g[a] != int(g[a]) or g[b] != int(g[b]):
                continue
            r_a, r_b = shannon_radius(a, int(g[a]), "XII"), shannon_radius(b, int(g[b]), "VI")
            if r_a is not None and r_b is not None:
                out.append((r_a + r_x) / (math.sqrt(2.0) * (r_b + r_x)))
        return out

    def _judge(self, a: str, b: str, anions: dict[str, float]) -> Verdict:
        ts = self.tolerance_factors(a, b, anions)
        if not ts:
            if self.unjudged == "succeed":
                return Verdict(True, None)
            return Verdict(False, None, f"no charge-balanced {a}{b}X3 with Shannon radii: no perovskite formed")
        t = min(ts, key=lambda v: 0.0 if self.low <= v <= self.high else min(abs(v - self.low), abs(v - self.high)))
        if self.low <= t <= self.high:
            return Verdict(True, t)
        return Verdict(False, t, f"Goldschmidt tolerance factor t={t:.3f} outside [{self.low:g}, {self.high:g}]: "
                                 "no perovskite formed; sample lost")


def _sites(structure: Structure) -> tuple[str, str, dict[str, float]]:
    """(A, B, anion counts per formula unit): B is the cation nearest to an anion.

    Raises:
        ValueError: Not two cation species with anions of :data:`ANION_CHARGES`.
    """
    comp = structure.composition.reduced_composition
    anions = {str(e): float(n) for e, n in comp.items() if str(e) in ANION_CHARGES}
    cations = sorted({site.specie.symbol for site in structure if site.specie.symbol not in ANION_CHARGES})
    if not anions or not 1 <= len(cations) <= 2:
        raise ValueError(f"{comp.reduced_formula} is not an ABX3 perovskite with anions {sorted(ANION_CHARGES)}")
    if len(cations) == 1:  # A = B: the rule cannot tell the sites apart and never judges it
        return cations[0], cations[0], anions
    nearest: dict[str, float] = {}
    for i, site in enumerate(structure):
        el = site.specie.symbol
        if el in ANION_CHARGES:
            continue
        d = min(structure.get_distance(i, j) for j, s in enumerate(structure) if s.specie.symbol in ANION_CHARGES)
        nearest[el] = min(d, nearest.get(el, math.inf))
    b = min(cations, key=lambda c: nearest[c])
    a = next(c for c in cations if c != b)
    return a, b, anions
