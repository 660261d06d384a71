"""XRD phase identification in the characterization plan: real simulator process, pyserial, RunEngine, SQL.

The simulator's journal holds the truth of every sample (its phases); the verdict recorded in
the repository must match it, and a value measured on the wrong phase must never be ``ok``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from instruments_helpers import CRYSTAL_WORLD, crystal_sim, journal_records, simulator  # noqa: F401

from devices.phase_detector import NOT_TARGET, XRDPhaseDetector
from devices.plans import characterize, synthesize
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation
from sdl.lab.documents import RepositoryWriter
from sdl.lab.runner import run_plan
from sdl.repository import Store
from sdl.xrd import PhaseIdentifier, PhaseTable, Reference, ReferenceLibrary
from sdl.xrd.phases import parse_cif
from simulators.server import SimulatorProcess

ROOT = Path(__file__).resolve().parent.parent
PHASES = ROOT / "simulators" / "worlds" / "competing_phases_demo.csv.gz"


@pytest.fixture(scope="module")
def references() -> object:
    import csv
    import gzip

    with gzip.open(CRYSTAL_WORLD, "rt", newline="") as handle:
        cifs = {row["id"]: row["cif"] for row in csv.DictReader(handle)}
    library = ReferenceLibrary(PhaseTable.load(PHASES))

    def of(candidate: str) -> tuple[Reference, list[Reference]]:
        return library.references(candidate, parse_cif(cifs[candidate], candidate))

    return of


@pytest.fixture(scope="module")
def impure_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """Robot + station where every sample (of a candidate with a competing phase) is impure."""
    tmp = tmp_path_factory.mktemp("impure-sim")
    with simulator(CRYSTAL_WORLD, tmp, journal=tmp / "journal.jsonl", impurity_rate=1.0, impurity_phases=PHASES,
                   xrd_strain=0.005, xrd_intensity_noise=0.05, seed=5) as sim:
        sim.journal = tmp / "journal.jsonl"  # type: ignore[attr-defined]
        yield sim


def _experiment(store: Store, candidate: str) -> int:
    c = store.get_or_create_campaign("xrd-plan", snapshot={"objective": {"property": "e_form", "goal": "minimize"}},
                                     config_hash="h", seed=0, budget=5)
    eid = store.propose_experiment(c.id, idempotency_key=f"xrd-plan:{candidate}", candidate_key=candidate,
                                   params={}, provenance={})
    store.start_experiment(eid, instruments=["robot", "station"])
    return eid


def _make_and_measure(sim: SimulatorProcess, store: Store, candidate: str, references: object,
                      job: str) -> tuple[int, XRDPhaseDetector, list[str]]:
    robot = SynthesisRobot(name="robot", url=sim.url, timeout=30)
    station = CharacterizationStation(name="station", url=sim.url, properties=["e_form"], raw=True, timeout=30)
    detector = XRDPhaseDetector(name="station_phases", station=station, references=references,  # type: ignore[arg-type]
                                identifier=PhaseIdentifier())
    eid = _experiment(store, candidate)
    writer = RepositoryWriter(store)
    md = {"sdl": {"experiment_id": eid}}
    made = run_plan(synthesize(robot, {"job_id": job, "candidate": candidate}, md=md), subscribers=[writer])
    assert made.ok, made.exception
    recipe = {"job_id": job, "measure_job_id": f"{job}.m1", "candidate": candidate, "sample": robot.sample.get()}
    measured = run_plan(characterize(station, recipe, md=md, phases=detector), subscribers=[writer])
    assert measured.ok, measured.exception
    assert not writer.errors, writer.errors
    for device in (robot, station, detector):
        device.close()
    return eid, detector, list(measured.run_uids)


def test_impure_sample_is_recorded_as_target_not_formed(impure_sim: SimulatorProcess, database_url: str,
                                                        references: object) -> None:
    store = Store.from_url(database_url, create=True)
    try:
        candidate = "perov_60"
        eid, detector, runs = _make_and_measure(impure_sim, store, candidate, references, "xrd-impure-1")
        truth = next(r["phases"] for r in journal_records(impure_sim.journal)  # type: ignore[attr-defined]
                     if r.get("job_id") == "xrd-impure-1.m1" and r["event"] == "finished")
        assert truth["impure"] and truth["target"] == candidate
        (impurity,) = (k for k in truth["fractions"] if k != candidate)

        by_property = {m.property: m for m in store.measurements(experiment_id=eid)}
        assert by_property["target_formed"].value == 0.0 and by_property["target_formed"].quality == "ok"
        fraction = by_property["target_phase_fraction"]
        assert fraction.quality == "ok" and fraction.run_uid == runs[0]
        assert fraction.value == pytest.approx(truth["fractions"][candidate], abs=0.12)
        assert by_property["e_form"].quality == NOT_TARGET  # a value of the wrong phase is never learnt

        (event,) = [d.document for d in store.documents(runs[0]) if d.name == "event"]
        assert event["data"]["station_phases_identified"] == impurity
        assert event["data"]["station_quality"] == "ok"  # the instrument itself was fine
        assert json.loads(event["data"]["station_phases_fractions"])[impurity] > 0.5
        assert f"target {candidate} not formed: XRD identifies {impurity}" in event["data"]["station_phases_summary"]
        start = next(d.document for d in store.documents(runs[0]) if d.name == "start")
        assert start["detectors"] == ["station", "station_phases"]
        assert start["sdl"]["measurements"]["station_e_form"]["quality_key"] == "station_phases_quality"
        assert detector.last is not None and detector.last.identified == impurity
    finally:
        store.close()


def test_pure_sample_is_recorded_as_formed(crystal_sim: SimulatorProcess, sqlite_url: str,  # noqa: F811
                                           references: object) -> None:
    store = Store.from_url(sqlite_url, create=True)
    try:
        eid, _, _ = _make_and_measure(crystal_sim, store, "perov_33", references, "xrd-pure-1")
        by_property = {m.property: m for m in store.measurements(experiment_id=eid)}
        assert by_property["target_formed"].value == 1.0
        assert by_property["target_phase_fraction"].value > 0.95
        assert by_property["e_form"].quality == "ok"
    finally:
        store.close()


def test_detector_needs_a_station_that_streams_its_pattern(crystal_sim: SimulatorProcess,  # noqa: F811
                                                          references: object) -> None:
    station = CharacterizationStation(name="station", url=crystal_sim.url, properties=["e_form"])
    with pytest.raises(ValueError, match="station station must stream its raw pattern"):
        XRDPhaseDetector(name="p", station=station, references=references,  # type: ignore[arg-type]
                         identifier=PhaseIdentifier())
    station.close()
