"""Powder XRD patterns: simulated sticks, lattice strain, mixtures, and Gaussian-broadened profiles.

Why sticks and profiles apart: pymatgen's ``XRDCalculator`` gives a list of reflections (2θ,
relative intensity), which is what a simulated station streams and what a reference database
holds. Comparing two patterns needs them on one 2θ grid with a peak width, so both are broadened
the same way (:class:`ProfileGrid`) before any similarity is computed. A measured sample never
has exactly the lattice of its reference (DFT lattice constants are off by about 1 %, samples are
strained), so :meth:`StickPattern.strained` moves reflections as an isotropic strain of the
lattice would (Bragg's law), and the phase identification scans that strain.

Simulating a pattern costs about 10 ms per 5-atom cell, so :class:`PatternCache` keeps them per
structure (keyed by the SHA-256 of its CIF text or a caller's key).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

# At module load, not in the method: scipy's lazy submodule import raced when two threads took it
# at once (``module 'scipy' has no attribute '_lib'``, seen in the simulator's RAW threads).
from scipy.ndimage import gaussian_filter1d

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = [
    "CU_KA",
    "TWO_THETA_RANGE",
    "StickPattern",
    "ProfileGrid",
    "PatternCache",
    "simulate_pattern",
    "mix",
]

CU_KA = 1.54184
"""Wavelength of Cu K-alpha in Å (pymatgen's ``"CuKa"``, the weighted K-alpha1/K-alpha2 mean)."""
TWO_THETA_RANGE = (10.0, 90.0)
"""The 2θ window (degrees) of the simulated station and of the references."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StickPattern:
    """Reflections of a powder pattern.

    Attributes:
        two_theta: Peak positions, degrees, ``[n_peaks]``.
        intensity: Peak intensities (any scale, non-negative), ``[n_peaks]``.
    """

    two_theta: FloatArray
    intensity: FloatArray

    @classmethod
    def from_rows(
        cls, two_theta: Sequence[float], intensity: Sequence[float], *, what: str = "pattern"
    ) -> StickPattern:
        """Validate measured rows (as streamed by a station) into a pattern.

        Raises:
            ValueError: naming ``what`` when the arrays are empty, of different lengths, not
                finite, negative, or all zero.
        """
        x = np.asarray(two_theta, dtype=float).ravel()
        y = np.asarray(intensity, dtype=float).ravel()
        if x.size == 0:
            raise ValueError(f"{what}: no reflections (empty two_theta)")
        if x.size != y.size:
            raise ValueError(f"{what}: two_theta has {x.size} values but intensity has {y.size}")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError(f"{what}: two_theta and intensity must be finite numbers")
        if (y < 0).any():
            raise ValueError(f"{what}: intensity must be >= 0 (min {y.min():g})")
        if not (y > 0).any():
            raise ValueError(f"{what}: every intensity is zero")
        return cls(x, y)

    def strained(self, strain: float, wavelength: float = CU_KA) -> StickPattern:
        """The pattern of the same lattice stretched isotropically by ``strain`` (d → d·(1+strain)).

        Reflections that leave the physical range (sin θ > 1) are dropped.
        """
        if strain == 0.0:
            return self
        sin_theta = np.sin(np.radians(self.two_theta) / 2.0) / (1.0 + strain)
        keep = sin_theta < 1.0
        return StickPattern(np.degrees(2.0 * np.arcsin(sin_theta[keep])), self.intensity[keep])

    def scaled(self, factors: FloatArray) -> StickPattern:
        """Intensities multiplied element-wise (e.g. by measurement noise), clipped at zero."""
        return StickPattern(self.two_theta, np.clip(self.intensity * factors, 0.0, None))

    def normalized(self) -> StickPattern:
        """Intensities scaled to sum to one (the share of the diffracted intensity per peak)."""
        total = float(self.intensity.sum())
        return StickPattern(self.two_theta, self.intensity / total if total > 0 else self.intensity)

    def rows(self, max_intensity: float = 100.0) -> list[tuple[float, float]]:
        """``(two_theta, intensity)`` rows sorted by angle, the strongest peak at ``max_intensity``."""
        order = np.argsort(self.two_theta, kind="stable")
        top = float(self.intensity.max()) if self.intensity.size else 0.0
        scale = max_intensity / top if top > 0 else 1.0
        return [(float(x), float(y * scale)) for x, y in zip(self.two_theta[order], self.intensity[order], strict=True)]


def mix(patterns: Sequence[StickPattern], fractions: Sequence[float]) -> StickPattern:
    """A phase mixture: each pattern normalized to unit total intensity, weighted by its fraction.

    The fractions are therefore shares of the diffracted intensity, which is what the phase
    identification estimates back (no reference-intensity-ratio correction).
    """
    if len(patterns) != len(fractions) or not patterns:
        raise ValueError(f"mix needs one fraction per pattern: {len(patterns)} patterns, {len(fractions)} fractions")
    parts = [(p.normalized(), float(f)) for p, f in zip(patterns, fractions, strict=True) if f > 0]
    if not parts:
        raise ValueError(f"mix: every fraction is zero ({list(fractions)})")
    return StickPattern(np.concatenate([p.two_theta for p, _ in parts]),
                        np.concatenate([p.intensity * f for p, f in parts]))


def simulate_pattern(structure: Structure, *, wavelength: float = CU_KA,
                     two_theta_range: tuple[float, float] = TWO_THETA_RANGE) -> StickPattern:
    """pymatgen's powder pattern of a structure (``XRDCalculator``), strongest peak at 100."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    pattern = XRDCalculator(wavelength=wavelength).get_pattern(structure, two_theta_range=two_theta_range)
    return StickPattern(np.asarray(pattern.x, dtype=float), np.asarray(pattern.y, dtype=float))


@dataclass(frozen=True)
class ProfileGrid:
    """A 2θ grid and a Gaussian peak width: where patterns are compared.

    Attributes:
        start: First angle, degrees.
        stop: Last angle, degrees.
        step: Grid step, degrees.
        fwhm: Full width at half maximum of every peak, degrees (0.1–0.2 for a lab diffractometer).
    """

    start: float = TWO_THETA_RANGE[0]
    stop: float = TWO_THETA_RANGE[1]
    step: float = 0.02
    fwhm: float = 0.15

    def __post_init__(self) -> None:
        if not self.stop > self.start:
            raise ValueError(f"profile grid: stop={self.stop} must be above start={self.start}")
        if not 0 < self.step < (self.stop - self.start):
            raise ValueError(f"profile grid: step={self.step} must be > 0 and below the range")
        if not self.fwhm >= self.step:
            raise ValueError(f"profile grid: fwhm={self.fwhm} must be >= step={self.step}")

    @property
    def size(self) -> int:
        """Number of grid points."""
        return round((self.stop - self.start) / self.step) + 1

    @property
    def two_theta(self) -> FloatArray:
        """The grid, degrees, ``[size]``."""
        return self.start + self.step * np.arange(self.size, dtype=float)

    def broaden(self, patterns: Sequence[StickPattern]) -> FloatArray:
        """Gaussian-broadened profiles, one row per pattern, ``[len(patterns), size]``.

        Each reflection is split between its two neighbouring grid points (linear weights) and
        the result is convolved with the Gaussian: exact to well below a grid step, and cheap
        enough to broaden dozens of strained copies of a pattern per measurement.
        """
        out = np.zeros((len(patterns), self.size), dtype=float)
        if patterns:
            rows = np.concatenate([np.full(p.two_theta.size, i) for i, p in enumerate(patterns)])
            position = (np.concatenate([p.two_theta for p in patterns]) - self.start) / self.step
            weight = np.concatenate([p.intensity for p in patterns])
            inside = (position >= 0) & (position <= self.size - 1)
            rows, position, weight = rows[inside], position[inside], weight[inside]
            low = np.floor(position).astype(int)
            frac = position - low
            high = np.minimum(low + 1, self.size - 1)
            np.add.at(out, (rows, low), weight * (1.0 - frac))
            np.add.at(out, (rows, high), weight * frac)
        sigma = self.fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / self.step
        return np.asarray(gaussian_filter1d(out, sigma, axis=1, mode="constant"), dtype=float)


class PatternCache:
    """Simulated stick patterns per structure, computed once (thread-safe).

    Args:
        wavelength: X-ray wavelength, Å.
        two_theta_range: Angles simulated, degrees.
    """

    def __init__(self, *, wavelength: float = CU_KA, two_theta_range: tuple[float, float] = TWO_THETA_RANGE) -> None:
        self.wavelength = wavelength
        self.two_theta_range = two_theta_range
        self._patterns: dict[str, StickPattern] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key_of(cif: str) -> str:
        """Cache key of a structure given as CIF text."""
        return hashlib.sha256(cif.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        with self._lock:
            return len(self._patterns)

    def get(self, key: str, structure: Structure) -> StickPattern:
        """The pattern of ``structure`` under ``key``, simulated on first use."""
        with self._lock:
            found = self._patterns.get(key)
        if found is not None:
            return found
        pattern = simulate_pattern(structure, wavelength=self.wavelength, two_theta_range=self.two_theta_range)
        with self._lock:
            return self._patterns.setdefault(key, pattern)
