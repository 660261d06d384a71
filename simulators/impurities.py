"""Seeded impurity mode: which phases a simulated sample really holds, and the XRD pattern it gives.

Why in the station's simulator: a synthesis robot reports "done" whatever formed in the crucible;
only the diffraction pattern tells whether the target phase is there (as in an autonomous lab that
checks every sample by XRD). So the truth of a sample (its phases) lives where it is revealed:
with probability ``rate`` (drawn once per sample from the seed and the sample's id, so every
measurement of one sample agrees) the sample holds a competing phase of the target's composition
(a real structure from a phase table: another polymorph, swapped cation sites, another anion
order) as its majority phase and the target only as a minority (``0`` to ``max_target_fraction``
of the diffracted intensity); otherwise it is the pure target. A target without a competing phase
in the table always forms. Measured patterns may carry a seeded isotropic lattice strain and
multiplicative intensity noise, so that phase identification has to tolerate real-sample
mismatches. Property values are not touched: the lab flags them ``not_target``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdl.xrd.patterns import PatternCache, StickPattern, mix
from sdl.xrd.phases import PhaseTable, parse_cif

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["SamplePhases", "ImpurityModel"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplePhases:
    """The phases of one sample.

    Attributes:
        sample: The sample's id (or the measurement's, when the lab gave none).
        target: The candidate that was meant to form.
        fractions: Phase id → share of the diffracted intensity (sums to 1), target first.
        strain: Isotropic lattice strain applied to every phase's pattern.
    """

    sample: str
    target: str
    fractions: dict[str, float]
    strain: float = 0.0

    @property
    def impure(self) -> bool:
        """Whether something other than the target is the majority phase."""
        return self.fractions.get(self.target, 0.0) < 0.5

    def as_record(self) -> dict[str, object]:
        """JSON-able form for the simulator's journal (the instrument log of the truth)."""
        return {"sample": self.sample, "target": self.target, "fractions": dict(self.fractions),
                "strain": self.strain, "impure": self.impure}


class ImpurityModel:
    """Draws each sample's phases and renders its measured XRD pattern.

    Args:
        table: Competing phases (by composition); ``None`` means no impurity can form.
        rate: Probability that a sample's majority phase is a competing phase, in [0, 1].
        seed: Seed of every draw (combined with the sample id).
        max_target_fraction: Largest share of the target in an impure sample.
        strain: Largest isotropic lattice strain of a sample (uniform in ±strain).
        intensity_noise: Relative standard deviation of each reflection's intensity.
    """

    def __init__(
        self,
        table: PhaseTable | None,
        *,
        rate: float = 0.0,
        seed: int = 0,
        max_target_fraction: float = 0.3,
        strain: float = 0.0,
        intensity_noise: float = 0.0,
    ) -> None:
        for name, value, high in (("impurity rate", rate, 1.0), ("max_target_fraction", max_target_fraction, 0.5),
                                  ("xrd strain", strain, 0.05), ("xrd intensity noise", intensity_noise, 1.0)):
            if not 0.0 <= value <= high:
                raise ValueError(f"{name}={value!r} must be within [0, {high:g}]")
        if rate > 0 and table is None:
            raise ValueError(f"impurity rate={rate} needs a table of competing phases")
        self.table = table
        self.rate = rate
        self.seed = seed
        self.max_target_fraction = max_target_fraction
        self.strain = strain
        self.intensity_noise = intensity_noise
        self.cache = PatternCache()
        self._structures: dict[str, Structure] = {}

    def _target(self, target: str, cif: str) -> Structure:
        structure = self._structures.get(target)
        if structure is None:
            structure = self._structures[target] = parse_cif(cif, f"candidate {target}")
        return structure

    def phases_of(self, target: str, cif: str, sample: str) -> SamplePhases:
        """The phases of ``sample`` (made for candidate ``target`` with structure ``cif``): decided once per id."""
        rng = random.Random(f"{self.seed}:phases:{sample}")
        draw, pick, share, strain_u = rng.random(), rng.random(), rng.random(), rng.random()
        strain = round((2.0 * strain_u - 1.0) * self.strain, 6)
        if self.rate > 0 and draw < self.rate and self.table is not None:
            competitors = self.table.competitors(target, self._target(target, cif))
            if competitors:
                other = competitors[int(pick * len(competitors)) % len(competitors)]
                kept = round(share * self.max_target_fraction, 6)
                return SamplePhases(sample, target, {target: kept, other.phase_id: round(1.0 - kept, 6)}, strain)
            logger.info("candidate %s has no competing phase in %s: the target forms", target, self.table.source)
        return SamplePhases(sample, target, {target: 1.0}, strain)

    def pattern(self, phases: SamplePhases, cif: str) -> list[tuple[float, float]]:
        """The measured pattern of a sample: ``(two_theta_deg, intensity_percent)`` rows."""
        patterns: list[StickPattern] = []
        fractions: list[float] = []
        for phase_id, fraction in phases.fractions.items():
            if phase_id == phases.target:
                structure = self._target(phase_id, cif)
                key = "target:" + PatternCache.key_of(cif)
            else:
                assert self.table is not None  # an impure sample was drawn from the table
                phase = self.table.get(phase_id)
                structure, key = phase.structure, PatternCache.key_of(phase.cif)
            patterns.append(self.cache.get(key, structure).strained(phases.strain))
            fractions.append(fraction)
        measured = mix(patterns, fractions)
        if self.intensity_noise > 0:
            rng = np.random.default_rng(random.Random(f"{self.seed}:xrd-noise:{phases.sample}").getrandbits(64))
            measured = measured.scaled(rng.normal(1.0, self.intensity_noise, measured.intensity.size))
        return measured.rows()
