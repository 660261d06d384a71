"""sdl.xrd on real structures: patterns, competing phases and phase identification (mixtures too).

References are real crystals: Materials Project / OQMD polymorph sets (``tests/data/xrd``) and the
CMR site and anion-order variants of the demo world (``simulators/worlds/competing_phases_demo``).
"Measured" patterns are those structures' patterns with a random lattice strain and intensity
noise, as a real sample would differ from its database entry.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from sdl.xrd import (
    UNIDENTIFIED,
    Phase,
    PhaseIdentifier,
    PhaseTable,
    PhaseTableError,
    ProfileGrid,
    Reference,
    ReferenceLibrary,
    StickPattern,
    mix,
    simulate_pattern,
)
from sdl.xrd.phases import parse_cif

ROOT = Path(__file__).resolve().parent.parent
POLYMORPHS = ROOT / "tests" / "data" / "xrd" / "mp_oqmd_polymorphs.csv.gz"
DEMO_PHASES = ROOT / "simulators" / "worlds" / "competing_phases_demo.csv.gz"


@pytest.fixture(scope="module")
def polymorphs() -> PhaseTable:
    return PhaseTable.load(POLYMORPHS)


@pytest.fixture(scope="module")
def library(polymorphs: PhaseTable) -> ReferenceLibrary:
    return ReferenceLibrary(polymorphs)


def _measured(pattern: StickPattern, rng: np.random.Generator, strain: float = 0.005,
              noise: float = 0.05) -> StickPattern:
    strained = pattern.strained(float(rng.uniform(-strain, strain)))
    return strained.scaled(rng.normal(1.0, noise, strained.intensity.size))


def _set_of(table: PhaseTable, library: ReferenceLibrary, formula: str) -> tuple[Reference, list[Reference]]:
    first = table.of_formula(formula)[0]
    return library.references(first.phase_id, first.structure)


def test_simulated_pattern_is_pymatgens_and_strain_follows_braggs_law(polymorphs: PhaseTable) -> None:
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    structure = polymorphs.get("mp-5986").structure  # BaTiO3, P4mm
    ours = simulate_pattern(structure)
    theirs = XRDCalculator("CuKa").get_pattern(structure, two_theta_range=(10, 90))
    assert ours.two_theta.tolist() == pytest.approx(list(theirs.x))
    assert ours.intensity.max() == pytest.approx(100.0)
    stretched = ours.strained(0.01)
    d_before = 1.54184 / (2 * np.sin(np.radians(ours.two_theta) / 2))
    d_after = 1.54184 / (2 * np.sin(np.radians(stretched.two_theta) / 2))
    assert d_after == pytest.approx(d_before * 1.01)
    # A real stretched lattice gives the same pattern (isotropic strain of every lattice vector).
    bigger = structure.copy()
    bigger.scale_lattice(structure.volume * 1.01**3)
    real = simulate_pattern(bigger)
    window = (stretched.two_theta > 11) & (stretched.two_theta < 88)
    assert real.two_theta[(real.two_theta > 11) & (real.two_theta < 88)] == pytest.approx(
        stretched.two_theta[window], abs=1e-6)


def test_broadened_profile_keeps_area_and_peak_position() -> None:
    grid = ProfileGrid(step=0.02, fwhm=0.2)
    profile = grid.broaden([StickPattern(np.array([30.013, 50.0]), np.array([2.0, 1.0]))])[0]
    assert profile.sum() == pytest.approx(3.0, rel=1e-6)
    x = grid.two_theta
    near = (x > 29) & (x < 31)
    centre = float((x[near] * profile[near]).sum() / profile[near].sum())
    assert centre == pytest.approx(30.013, abs=1e-3)
    half = profile[near].max() / 2
    width = float(np.ptp(x[near][profile[near] >= half])) + grid.step
    assert width == pytest.approx(0.2, abs=2 * grid.step)


def test_every_real_polymorph_is_identified_among_its_siblings(polymorphs: PhaseTable,
                                                               library: ReferenceLibrary) -> None:
    rng = np.random.default_rng(7)
    identifier = PhaseIdentifier()
    checked = 0
    for formula in sorted({p.formula for p in polymorphs.of_formula("BaTiO3")} | {"CaSnS3", "FeBiO3", "SrZrO3"}):
        target, competitors = _set_of(polymorphs, library, formula)
        assert competitors, f"{formula}: the data has several polymorphs"
        for truth in [target, *competitors]:
            sample = _measured(truth.pattern, rng)
            analysis = identifier.identify(sample.two_theta, sample.intensity, target, competitors)
            assert analysis.identified == truth.phase_id, (formula, truth.label, analysis.summary())
            assert analysis.target_formed == (truth is target), analysis.summary()
            assert analysis.fractions[truth.phase_id] > 0.8 and analysis.fit_similarity > 0.95
            checked += 1
    assert checked >= 12


def test_demo_world_variants_are_told_apart() -> None:
    """Site-swapped and anion-ordered CMR variants of demo candidates: each one is found as itself."""
    table = PhaseTable.load(DEMO_PHASES)
    library = ReferenceLibrary(table)
    identifier = PhaseIdentifier()
    rng = np.random.default_rng(11)
    formulas = sorted({p.formula for f in ("VZrO2N", "PdCoON2", "RuKO2F", "CsCuO2N", "InWN3")
                       for p in table.of_formula(f)})
    assert len(formulas) == 5
    for formula in formulas:
        target, competitors = _set_of(table, library, formula)
        assert competitors and all(c.phase_id != target.phase_id for c in competitors)
        for truth in [target, *competitors]:
            sample = _measured(truth.pattern, rng)
            analysis = identifier.identify(sample.two_theta, sample.intensity, target, competitors)
            assert analysis.identified == truth.phase_id, analysis.summary()


@pytest.mark.parametrize("share", [0.15, 0.35, 0.65, 0.85])
def test_mixture_fractions_are_estimated(share: float, polymorphs: PhaseTable, library: ReferenceLibrary) -> None:
    rng = np.random.default_rng(int(share * 100))
    identifier = PhaseIdentifier(threshold=0.5)
    for formula in ("BaTiO3", "CaSnS3", "FeBiO3"):
        target, competitors = _set_of(polymorphs, library, formula)
        other = competitors[-1]
        sample = mix([target.pattern.strained(0.003), other.pattern.strained(-0.004)], [share, 1 - share])
        sample = sample.scaled(rng.normal(1.0, 0.03, sample.intensity.size))
        analysis = identifier.identify(sample.two_theta, sample.intensity, target, competitors)
        assert analysis.target_fraction == pytest.approx(share, abs=0.1), (formula, analysis.summary())
        assert analysis.fractions[other.phase_id] == pytest.approx(1 - share, abs=0.1), analysis.summary()
        assert analysis.target_formed == (share >= 0.5)
        assert analysis.identified == (target.phase_id if share > 0.5 else other.phase_id)
        assert math.isclose(sum(analysis.fractions.values()), 1.0, abs_tol=1e-4)


def test_an_unknown_phase_is_unidentified_and_the_target_not_formed(polymorphs: PhaseTable,
                                                                    library: ReferenceLibrary) -> None:
    target, competitors = _set_of(polymorphs, library, "BaTiO3")
    stranger = library.reference_of(polymorphs.of_formula("FeBiO3")[2])  # another composition entirely
    analysis = PhaseIdentifier().identify(stranger.pattern.two_theta, stranger.pattern.intensity, target, competitors)
    assert analysis.identified == UNIDENTIFIED and not analysis.target_formed
    assert analysis.fit_similarity < 0.8
    assert "unexplained" in analysis.summary() and target.phase_id in analysis.summary()


def test_references_are_simulated_once(polymorphs: PhaseTable) -> None:
    library = ReferenceLibrary(polymorphs)
    first = polymorphs.of_formula("CaSnS3")[0]
    target, competitors = library.references(first.phase_id, first.structure)
    simulated = len(library.cache)
    assert simulated == 1 + len(competitors)
    again = library.references(first.phase_id, first.structure)
    assert again[0] is target and len(library.cache) == simulated
    # Competitors exclude the target and entries that are the target under StructureMatcher.
    assert first.phase_id not in {c.phase_id for c in competitors}
    twin = Phase("twin-of-" + first.phase_id, first.formula, first.cif)
    others = [polymorphs.get(c.phase_id) for c in competitors]
    kept = PhaseTable([first, twin, *others]).competitors(first.phase_id, first.structure)
    assert {c.phase_id for c in kept} == {c.phase_id for c in competitors}


@pytest.mark.parametrize(
    ("two_theta", "intensity", "words"),
    [
        ([], [], "no reflections"),
        ([20.0, 30.0], [1.0], "2 values but intensity has 1"),
        ([20.0, float("nan")], [1.0, 2.0], "finite"),
        ([20.0, 30.0], [1.0, -2.0], ">= 0"),
        ([20.0, 30.0], [0.0, 0.0], "every intensity is zero"),
        ([120.0, 130.0], [1.0, 2.0], "no reflection within 10–90"),
    ],
)
def test_bad_measured_patterns_are_named(two_theta: list[float], intensity: list[float], words: str,
                                         library: ReferenceLibrary, polymorphs: PhaseTable) -> None:
    target, competitors = _set_of(polymorphs, library, "SrZrO3")
    with pytest.raises(ValueError, match="measured XRD pattern of") as info:
        PhaseIdentifier().identify(two_theta, intensity, target, competitors)
    assert words in str(info.value)


def test_bad_phase_tables_are_named(tmp_path: Path) -> None:
    with pytest.raises(PhaseTableError, match="not found"):
        PhaseTable.load(tmp_path / "none.csv")
    no_cif = tmp_path / "no_cif.csv"
    no_cif.write_text("id,formula\nx,SrTiO3\n")
    with pytest.raises(PhaseTableError, match=r"no_cif.csv: phase table needs column 'cif'"):
        PhaseTable.load(no_cif)
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write("id,cif\nok-1,not a cif at all\n")
    with pytest.raises(PhaseTableError, match=r"bad.csv.gz:2: CIF does not parse"):
        PhaseTable.load(bad)
    twice = tmp_path / "twice.csv"
    cif = parse_cif(PhaseTable.load(POLYMORPHS).get("mp-5986").cif, "x").to(fmt="cif").replace('"', "'")
    twice.write_text(f'id,formula,cif\na,BaTiO3,"{cif}"\na,BaTiO3,"{cif}"\n')
    with pytest.raises(PhaseTableError, match="phase id 'a' appears twice"):
        PhaseTable.load(twice)


def test_identifier_options_are_checked() -> None:
    for kwargs, words in (({"threshold": 0.0}, "threshold=0.0"), ({"min_fit": 1.5}, "min_fit=1.5"),
                          ({"max_strain": 0.5}, "max_strain=0.5")):
        with pytest.raises(ValueError, match=words):
            PhaseIdentifier(**kwargs)
    with pytest.raises(ValueError, match="fwhm"):
        ProfileGrid(fwhm=0.001)
