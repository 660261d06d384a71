"""The simulator's impurity mode: seeded per sample, real competing phases, the pattern shows them.

In-process checks of :class:`simulators.impurities.ImpurityModel` on the demo world, and the
simulator's command line refusing impurity options it cannot honour (one line, exit code 2).
"""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdl.xrd import PhaseIdentifier, PhaseTable, ReferenceLibrary, StickPattern, simulate_pattern
from sdl.xrd.phases import parse_cif
from simulators.impurities import ImpurityModel

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "simulators" / "worlds" / "perovskites_demo.csv.gz"
PHASES = ROOT / "simulators" / "worlds" / "competing_phases_demo.csv.gz"


@pytest.fixture(scope="module")
def world_cifs() -> dict[str, str]:
    with gzip.open(WORLD, "rt", newline="") as handle:
        return {row["id"]: row["cif"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def table() -> PhaseTable:
    return PhaseTable.load(PHASES)


def test_rate_zero_is_the_pure_target_and_its_pymatgen_pattern(world_cifs: dict[str, str], table: PhaseTable) -> None:
    model = ImpurityModel(table, rate=0.0, seed=1)
    phases = model.phases_of("perov_33", world_cifs["perov_33"], "sample-a")
    assert phases.fractions == {"perov_33": 1.0} and not phases.impure
    rows = model.pattern(phases, world_cifs["perov_33"])
    truth = simulate_pattern(parse_cif(world_cifs["perov_33"], "perov_33"))
    assert [r[0] for r in rows] == pytest.approx(sorted(truth.two_theta))
    assert max(r[1] for r in rows) == pytest.approx(100.0)


def test_impure_samples_hold_a_real_competing_phase_and_their_pattern_shows_it(
        world_cifs: dict[str, str], table: PhaseTable) -> None:
    model = ImpurityModel(table, rate=1.0, seed=1, strain=0.005, intensity_noise=0.05)
    library = ReferenceLibrary(table)
    identifier = PhaseIdentifier()
    candidates = sorted(world_cifs)[:12]
    impure = 0
    for cid in candidates:
        phases = model.phases_of(cid, world_cifs[cid], f"sample-{cid}")
        competitors = table.competitors(cid, parse_cif(world_cifs[cid], cid))
        if not competitors:  # nothing else of its composition is known: the target forms
            assert phases.fractions == {cid: 1.0}
            continue
        impure += 1
        assert phases.impure and 0.0 <= phases.fractions[cid] <= 0.3 and abs(phases.strain) <= 0.005
        (other,) = (k for k in phases.fractions if k != cid)
        assert other in {c.phase_id for c in competitors}  # a real structure of the same composition
        rows = model.pattern(phases, world_cifs[cid])
        target, refs = library.references(cid, parse_cif(world_cifs[cid], cid))
        pattern = StickPattern.from_rows([r[0] for r in rows], [r[1] for r in rows])
        analysis = identifier.identify(pattern.two_theta, pattern.intensity, target, refs)
        assert analysis.identified == other and not analysis.target_formed, analysis.summary()
        assert analysis.target_fraction == pytest.approx(phases.fractions[cid], abs=0.12), analysis.summary()
    assert impure >= 10


def test_a_samples_phases_are_decided_once_by_seed_and_id(world_cifs: dict[str, str], table: PhaseTable) -> None:
    cid = "perov_60"
    a = ImpurityModel(table, rate=0.5, seed=4, strain=0.01)
    again = ImpurityModel(table, rate=0.5, seed=4, strain=0.01)
    draws = [a.phases_of(cid, world_cifs[cid], f"s{i}") for i in range(300)]
    assert draws == [again.phases_of(cid, world_cifs[cid], f"s{i}") for i in range(300)]
    share = sum(d.impure for d in draws) / len(draws)
    assert 0.4 < share < 0.6  # the configured rate (binomial sd ~0.03)
    other_seed = ImpurityModel(table, rate=0.5, seed=5, strain=0.01)
    assert [d.impure for d in draws] != [other_seed.phases_of(cid, world_cifs[cid], f"s{i}").impure
                                         for i in range(300)]
    first = a.pattern(draws[0], world_cifs[cid])
    assert first == a.pattern(draws[0], world_cifs[cid])  # noise too is the sample's, not the call's


def test_model_options_are_checked(table: PhaseTable) -> None:
    with pytest.raises(ValueError, match=r"impurity rate=1.5"):
        ImpurityModel(table, rate=1.5)
    with pytest.raises(ValueError, match="needs a table"):
        ImpurityModel(None, rate=0.1)
    with pytest.raises(ValueError, match=r"xrd strain=0.2"):
        ImpurityModel(table, strain=0.2)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--world", str(WORLD), "--impurity-rate", "0.3"], "--impurity-rate needs --impurity-phases"),
        (["--world", str(ROOT / "simulators" / "worlds" / "crossed_barrel.csv"), "--impurity-rate", "0.3",
          "--impurity-phases", str(PHASES)], "need a crystal world"),
        (["--world", str(WORLD), "--impurity-rate", "0.3", "--impurity-phases", str(ROOT / "none.csv")],
         "none.csv: phase table not found"),
    ],
)
def test_simulator_refuses_impurity_options_it_cannot_honour(args: list[str], words: str) -> None:
    done = subprocess.run([sys.executable, "-m", "simulators.server", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 2 and not done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr


def test_sdl_simulate_passes_the_impurity_options_on() -> None:
    done = subprocess.run([sys.executable, "-m", "sdl.cli.main", "simulate", "--world", str(WORLD),
                           "--impurity-rate", "0.3"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: --impurity-rate needs --impurity-phases (the competing phases to draw from)"


def test_noisy_patterns_stay_physical(world_cifs: dict[str, str], table: PhaseTable) -> None:
    model = ImpurityModel(table, rate=1.0, seed=2, intensity_noise=0.2)
    phases = model.phases_of("perov_74", world_cifs["perov_74"], "sample-x")
    rows = np.array(model.pattern(phases, world_cifs["perov_74"]))
    assert rows.shape[1] == 2 and (rows[:, 1] >= 0).all() and np.all(np.diff(rows[:, 0]) >= 0)
