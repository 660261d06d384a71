"""Phase identification: which of the target and its competing phases explain a measured XRD pattern.

Why this method: it is the classic search-match of a lab diffractometer reduced to what a closed
loop needs, and every step can be checked by hand. The measured reflections and each reference
pattern are Gaussian-broadened on one 2θ grid (:class:`~sdl.xrd.patterns.ProfileGrid`); each
reference is allowed an isotropic lattice strain (scanned within ``max_strain``: DFT lattices are
off by about 1 %) and scored by the cosine similarity of the broadened profiles; the phase
fractions are the non-negative least-squares weights of the unit-area reference profiles that
best rebuild the measured one (then each strain is refined against what the other phases leave,
and the weights are fitted again). A fraction is a share of the diffracted intensity, which
approximates the phase fraction without a reference-intensity-ratio correction.

The target formed when the fit explains the pattern (cosine of fit and measurement at least
``min_fit``) and the target's fraction is at least ``threshold``. A pattern that no combination
of the references explains is *unidentified*: the target did not form (something unknown did).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import nnls  # at module load: scipy's lazy submodule import races across threads

from sdl.xrd.patterns import FloatArray, PatternCache, ProfileGrid, StickPattern
from sdl.xrd.phases import Phase, PhaseTable

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["UNIDENTIFIED", "Reference", "ReferenceLibrary", "PhaseAnalysis", "PhaseIdentifier"]

logger = logging.getLogger(__name__)

UNIDENTIFIED = "unidentified"
"""The identified phase when no combination of the references explains the pattern."""


@dataclass(frozen=True)
class Reference:
    """A phase with its simulated pattern.

    Attributes:
        phase_id: Candidate id (the target) or phase-table id (a competitor).
        label: ``id (formula, space group)`` for messages.
        pattern: Its stick pattern.
    """

    phase_id: str
    label: str
    pattern: StickPattern


class ReferenceLibrary:
    """Reference patterns of targets and of their competing phases, simulated once and cached.

    Args:
        table: Known phases (the competitors of a target are those of its composition).
        cache: Where simulated patterns are kept (shared with other users if given).
    """

    def __init__(self, table: PhaseTable, cache: PatternCache | None = None) -> None:
        self.table = table
        self.cache = cache or PatternCache()
        self._lock = threading.Lock()
        self._sets: dict[str, tuple[Reference, list[Reference]]] = {}

    def references(self, target_id: str, target: Structure) -> tuple[Reference, list[Reference]]:
        """The target's reference and those of its competitors (cached per target id)."""
        with self._lock:
            found = self._sets.get(target_id)
        if found is not None:
            return found
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        target_key = "target:" + PatternCache.key_of(target.to(fmt="cif"))
        try:
            group = f", {SpacegroupAnalyzer(target, symprec=0.1).get_space_group_symbol()}"
        except Exception:  # noqa: BLE001 - a label only: spglib may fail on odd cells
            group = ""
        reference = Reference(target_id, f"{target_id} ({target.composition.reduced_formula}{group})",
                              self.cache.get(target_key, target))
        competitors = [self.reference_of(p) for p in self.table.competitors(target_id, target)]
        with self._lock:
            return self._sets.setdefault(target_id, (reference, competitors))

    def reference_of(self, phase: Phase) -> Reference:
        """The reference of one table phase."""
        return Reference(phase.phase_id, phase.label, self.cache.get(PatternCache.key_of(phase.cif), phase.structure))


@dataclass(frozen=True)
class PhaseAnalysis:
    """What the pattern says about one sample.

    Attributes:
        target_id: The phase that was meant to form.
        fractions: Phase id → share of the diffracted intensity (sums to 1), target first.
        similarities: Phase id → cosine similarity of its best-strained profile with the measured one.
        strains: Phase id → fitted isotropic lattice strain.
        fit_similarity: Cosine similarity of the fitted mixture and the measured profile.
        identified: Phase id with the largest fraction, or :data:`UNIDENTIFIED`.
        target_formed: Whether the target formed (see the module docstring).
        threshold: The target fraction the decision used.
        labels: Phase id → label for messages.
    """

    target_id: str
    fractions: dict[str, float]
    similarities: dict[str, float]
    strains: dict[str, float]
    fit_similarity: float
    identified: str
    target_formed: bool
    threshold: float
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def target_fraction(self) -> float:
        """The target's share of the diffracted intensity."""
        return self.fractions.get(self.target_id, 0.0)

    def summary(self) -> str:
        """One line: the verdict, the identified phase and the fractions."""
        if self.identified == UNIDENTIFIED:
            return (f"XRD pattern unexplained by the target and its {len(self.fractions) - 1} competing phases "
                    f"(fit similarity {self.fit_similarity:.2f}); target {self.target_id} not formed")
        ranked = sorted(self.fractions.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{self.labels.get(k, k)} {v:.0%}" for k, v in ranked if v >= 0.005)
        verdict = "formed" if self.target_formed else "not formed"
        return (f"target {self.target_id} {verdict}: XRD identifies {self.labels.get(self.identified, self.identified)}"
                f" (fractions {parts}; threshold {self.threshold:.0%}, fit similarity {self.fit_similarity:.2f})")


def _unit(rows: FloatArray) -> FloatArray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.asarray(rows / np.where(norms > 0, norms, 1.0), dtype=float)


class PhaseIdentifier:
    """Identifies the phases of a measured pattern among a target and its competitors.

    Args:
        threshold: Smallest target fraction for which the target counts as formed.
        min_fit: Smallest cosine similarity of fit and measurement for the pattern to count as explained.
        grid: The 2θ grid and peak width both patterns are broadened to.
        max_strain: Largest isotropic lattice strain a reference may be stretched by (0.01 = 1 %).
        strain_step: Step of the strain scan (refined ten times finer around its best point).
        refinements: Rounds of per-phase strain refinement after the first fit.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        min_fit: float = 0.8,
        grid: ProfileGrid | None = None,
        max_strain: float = 0.01,
        strain_step: float = 0.0005,
        refinements: int = 2,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be within (0, 1]")
        if not 0.0 < min_fit <= 1.0:
            raise ValueError(f"min_fit={min_fit} must be within (0, 1]")
        if not 0.0 <= max_strain < 0.2:
            raise ValueError(f"max_strain={max_strain} must be within [0, 0.2)")
        if strain_step <= 0:
            raise ValueError(f"strain_step={strain_step} must be > 0")
        self.threshold = threshold
        self.min_fit = min_fit
        self.grid = grid or ProfileGrid()
        self.max_strain = max_strain
        n = round(max_strain / strain_step)
        self.strains = strain_step * np.arange(-n, n + 1, dtype=float)
        self.strain_step = strain_step
        self.refinements = refinements

    def __repr__(self) -> str:
        return (f"PhaseIdentifier(threshold={self.threshold}, min_fit={self.min_fit}, fwhm={self.grid.fwhm}, "
                f"step={self.grid.step}, max_strain={self.max_strain}, strains={self.strains.size})")

    def _scan(self, pattern: StickPattern, against: FloatArray) -> tuple[float, float, FloatArray]:
        """Best strain of ``pattern`` against a unit profile: (strain, cosine, unit-area profile)."""
        strains = self.strains
        for _ in range(2):  # the grid, then ten times finer around its best point
            profiles = self.grid.broaden([pattern.strained(float(s)) for s in strains])
            scores = _unit(profiles) @ against
            best = int(np.argmax(scores))
            strain, score, profile = float(strains[best]), float(scores[best]), profiles[best]
            step = self.strain_step / 10.0
            strains = np.clip(strain + step * np.arange(-9, 10, dtype=float), -self.max_strain, self.max_strain)
        area = float(profile.sum())
        return strain, score, profile / area if area > 0 else profile

    def identify(
        self,
        two_theta: Sequence[float],
        intensity: Sequence[float],
        target: Reference,
        competitors: Sequence[Reference] = (),
    ) -> PhaseAnalysis:
        """Analyse one measured pattern (rows as a station streams them).

        Raises:
            ValueError: The measured pattern is empty, ragged, not finite or all zero.
        """
        measured = StickPattern.from_rows(two_theta, intensity, what=f"measured XRD pattern of {target.phase_id}")
        profile = self.grid.broaden([measured])[0]
        if not profile.any():
            raise ValueError(f"measured XRD pattern of {target.phase_id}: no reflection within "
                             f"{self.grid.start:g}–{self.grid.stop:g}° 2θ")
        unit = _unit(profile)
        refs: list[Reference] = [target]
        seen = {target.phase_id}
        for ref in competitors:
            if ref.phase_id not in seen:
                seen.add(ref.phase_id)
                refs.append(ref)
        scanned = [self._scan(ref.pattern, unit) for ref in refs]
        strains = [s for s, _, _ in scanned]
        similarities = {ref.phase_id: round(c, 6) for ref, (_, c, _) in zip(refs, scanned, strict=True)}
        columns = np.stack([p for _, _, p in scanned], axis=1)  # [grid, n_refs], unit area each
        measured_area = profile / float(profile.sum())
        weights, _ = nnls(columns, measured_area)
        for _ in range(self.refinements if len(refs) > 1 else 0):
            for i, ref in enumerate(refs):  # zero-weight phases too: a minority phase shows in the residual
                rest = measured_area - columns @ weights + weights[i] * columns[:, i]
                strain, _, column = self._scan(ref.pattern, _unit(np.clip(rest, 0.0, None)))
                strains[i], columns[:, i] = strain, column
            weights, _ = nnls(columns, measured_area)
        total = float(weights.sum())
        fractions = {ref.phase_id: (float(w) / total if total > 0 else 0.0)
                     for ref, w in zip(refs, weights, strict=True)}
        fit = columns @ weights
        fit_similarity = float(_unit(fit) @ unit) if fit.any() else 0.0
        explained = fit_similarity >= self.min_fit
        identified = max(fractions, key=lambda k: fractions[k]) if explained and total > 0 else UNIDENTIFIED
        formed = explained and fractions[target.phase_id] >= self.threshold
        return PhaseAnalysis(
            target_id=target.phase_id,
            fractions={k: round(v, 6) for k, v in fractions.items()},
            similarities=similarities,
            strains={ref.phase_id: round(s, 6) for ref, s in zip(refs, strains, strict=True)},
            fit_similarity=round(fit_similarity, 6),
            identified=identified,
            target_formed=bool(formed),
            threshold=self.threshold,
            labels={ref.phase_id: ref.label for ref in refs},
        )
