"""Instruments → documents → repository: real simulators, real RunEngine, real SQLite and PostgreSQL.

A synthesize-and-characterize plan stores every document and the world's real values as
measurements; an injected fault ends up in the event log and as a failed run, with no measurement.
"""

from __future__ import annotations

from pathlib import Path

from instruments_helpers import CRYSTAL_WORLD, crystal_sim, crystal_truth, simulator  # noqa: F401 - fixtures

from devices.plans import characterize, synthesize_and_characterize
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation
from sdl.exceptions import InstrumentTimeout, MaterialFailure
from sdl.lab.documents import RepositoryWriter
from sdl.lab.runner import run_plan
from sdl.repository.store import Store


def _experiment(store: Store, name: str, candidate: str) -> tuple[int, int]:
    campaign = store.get_or_create_campaign(name, snapshot={"test": name}, config_hash=name, seed=0, budget=3)
    exp = store.propose_experiment(campaign.id, idempotency_key=f"{name}:1", candidate_key=candidate,
                                   params={"candidate": candidate})
    store.start_experiment(exp, instruments=["robot", "station"])
    return campaign.id, exp


def test_plan_documents_and_real_values_reach_the_repository(store: Store, crystal_sim) -> None:  # noqa: F811
    truth = crystal_truth()["perov_60"]
    campaign_id, exp = _experiment(store, f"instr-ok-{id(store)}", "perov_60")
    robot = SynthesisRobot(name="robot", url=crystal_sim.url, timeout=30)
    station = CharacterizationStation(name="station", url=crystal_sim.url, properties=["e_form", "gap_gllbsc"])
    writer = RepositoryWriter(store)
    outcome = run_plan(
        synthesize_and_characterize(robot, station, {"job_id": f"repo-{campaign_id}-{exp}", "candidate": "perov_60"},
                                    md={"sdl": {"campaign_id": campaign_id, "experiment_id": exp}}),
        subscribers=[writer],
    )
    assert outcome.ok, outcome.exception
    assert not writer.errors, writer.errors
    store.complete_experiment(exp)

    runs = store.runs(exp)
    assert sorted(r.uid for r in runs) == sorted(outcome.run_uids)
    assert {r.plan_name: r.exit_status for r in runs} == {"synthesize": "success", "characterize": "success"}
    for uid in outcome.run_uids:
        names = [d.name for d in store.documents(uid)]
        assert names[0] == "start" and names[-1] == "stop" and "descriptor" in names and "event" in names

    measured = {m.property: m for m in store.measurements(experiment_id=exp)}
    assert set(measured) == {"e_form", "gap_gllbsc"}
    for prop, m in measured.items():
        assert m.value == truth[prop]  # the world's recorded value, noise 0
        assert (m.unit, m.instrument, m.quality, m.run_uid) == ("eV", "station", "ok", outcome.run_uids[1])
    assert store.get_experiment(exp).state == "completed"


def test_injected_fault_is_an_event_and_a_failed_run_with_no_measurement(store: Store, tmp_path: Path) -> None:
    campaign_id, exp = _experiment(store, f"instr-fault-{id(store)}", "perov_33")

    def log_fault(kind: str, message: str) -> None:
        store.log_event("instrument.fault", message, campaign_id=campaign_id, experiment_id=exp, level="warning",
                        payload={"kind": kind, "instrument": "station"})

    with simulator(CRYSTAL_WORLD, tmp_path, instrument="station", faults={"timeout": 1.0}) as sim:
        station = CharacterizationStation(name="station", url=sim.url, properties=["e_form"], units={"e_form": "eV"},
                                          line_timeout=0.2, retries=2, on_fault=log_fault)
        writer = RepositoryWriter(store)
        outcome = run_plan(characterize(station, {"job_id": f"fault-{exp}", "candidate": "perov_33"},
                                        md={"sdl": {"campaign_id": campaign_id, "experiment_id": exp}}),
                           subscribers=[writer])
    assert isinstance(outcome.exception, InstrumentTimeout)
    store.fail_experiment(exp, reason=str(outcome.exception), kind="instrument")
    assert not writer.errors, writer.errors

    faults = store.events(campaign_id, "instrument.fault")
    assert len(faults) == 3 and all(e.payload["kind"] == "timeout" for e in faults)  # 1 try + 2 retries
    (run,) = store.runs(exp)
    assert run.exit_status == "fail" and run.reason
    assert store.measurements(experiment_id=exp) == []
    assert store.get_experiment(exp).state == "failed"


def test_material_failure_and_drift_are_recorded_for_what_they_are(store: Store, tmp_path: Path) -> None:
    campaign_id, exp = _experiment(store, f"instr-material-{id(store)}", "perov_33")
    with simulator(CRYSTAL_WORLD, tmp_path, faults={"failed_synthesis": 1.0, "drift": 1.0}) as sim:
        robot = SynthesisRobot(name="robot", url=sim.url, timeout=30)
        station = CharacterizationStation(name="station", url=sim.url, properties=["e_form"])
        md = {"sdl": {"campaign_id": campaign_id, "experiment_id": exp}}
        writer = RepositoryWriter(store)
        lost = run_plan(synthesize_and_characterize(robot, station, {"job_id": f"lost-{exp}", "candidate": "perov_33"},
                                                    md=md), subscribers=[writer])
        assert isinstance(lost.exception, MaterialFailure)
        store.fail_experiment(exp, reason=str(lost.exception), kind="material")
        assert store.measurements(experiment_id=exp) == []

        _, exp2 = _experiment(store, f"instr-drift-{id(store)}", "perov_33")
        drifted = run_plan(characterize(station, {"job_id": f"drift-{exp2}", "candidate": "perov_33"},
                                        md={"sdl": {"campaign_id": campaign_id, "experiment_id": exp2}}),
                           subscribers=[writer])
        assert drifted.ok
    (m,) = store.measurements(experiment_id=exp2)
    assert m.quality == "drift" and m.value != crystal_truth()["perov_33"]["e_form"]
    assert not writer.errors, writer.errors
