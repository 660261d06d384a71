"""Ophyd devices on real simulator processes, driven by the real RunEngine through pyserial."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from bluesky.protocols import Movable, Readable, Stoppable, Triggerable
from instruments_helpers import (  # noqa: F401 - fixtures
    CRYSTAL_WORLD,
    crystal_sim,
    crystal_truth,
    simulator,
    table_replicates,
    table_sim,
)

from devices.plans import characterize, synthesize
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation
from devices.transport import LineTransport
from sdl.exceptions import InstrumentConnectionError, InstrumentError, InstrumentRejected, MaterialFailure
from sdl.lab.runner import run_plan


def test_devices_satisfy_the_bluesky_protocols(crystal_sim) -> None:  # noqa: F811
    robot = SynthesisRobot(name="robot", url=crystal_sim.url)
    station = CharacterizationStation(name="station", url=crystal_sim.url, properties=["e_form"])
    assert isinstance(robot, Movable) and isinstance(robot, Stoppable)
    assert isinstance(station, Triggerable) and isinstance(station, Readable)
    desc = station.describe()
    assert desc["station_e_form"]["units"] == "eV" and desc["station_e_form_std"]["dtype"] == "number"
    assert desc["station_quality"]["dtype"] == "string"
    before = station.read()
    assert math.isnan(before["station_e_form"]["value"]) and before["station_quality"]["value"] == "none"


def test_robot_set_returns_at_once_and_finishes_with_the_sample(crystal_sim) -> None:  # noqa: F811
    robot = SynthesisRobot(name="robot", url=crystal_sim.url, timeout=20)
    status = robot.set({"job_id": "dev-set-1", "candidate": "perov_60"})
    assert not status.done  # a synthesis takes time even at this time scale
    status.wait(20)
    reading = robot.read()
    assert reading["robot_state"]["value"] == "done"
    assert reading["robot_sample_key"]["value"] == "perov_60"
    assert robot.job("dev-set-1")["state"] == "done"
    assert robot.job("never-started")["state"] == "unknown"


def test_station_reads_the_worlds_recorded_values(crystal_sim) -> None:  # noqa: F811
    truth = crystal_truth()
    station = CharacterizationStation(name="station", url=crystal_sim.url, properties=["e_form", "gap_gllbsc"])
    for cid in sorted(truth)[:3]:
        station.recipe.put(json.dumps({"job_id": f"dev-{cid}", "candidate": cid}))
        station.trigger().wait(20)
        reading = station.read()
        assert reading["station_e_form"]["value"] == truth[cid]["e_form"]
        assert reading["station_gap_gllbsc"]["value"] == truth[cid]["gap_gllbsc"]
        assert reading["station_quality"]["value"] == "ok"


def test_station_streams_the_xrd_pattern_as_array_keys(crystal_sim) -> None:  # noqa: F811
    station = CharacterizationStation(name="xrd", url=crystal_sim.url, properties=["e_form"], raw=True)
    docs: list[tuple[str, dict]] = []
    outcome = run_plan(characterize(station, {"job_id": "dev-xrd", "candidate": "perov_33"}),
                       subscribers=[lambda n, d: docs.append((n, d))])
    assert outcome.ok, outcome.exception
    event = next(d for n, d in docs if n == "event")
    two_theta, intensity = event["data"]["xrd_xrd_two_theta"], event["data"]["xrd_xrd_intensity"]
    assert len(two_theta) == len(intensity) > 5 and max(intensity) == pytest.approx(100.0)
    assert all(10 <= x <= 90 for x in two_theta)
    descriptor = next(d for n, d in docs if n == "descriptor")
    assert descriptor["data_keys"]["xrd_xrd_intensity"]["shape"] == [len(intensity)]


def test_table_world_measurement_is_one_real_replicate(table_sim) -> None:  # noqa: F811
    replicates = table_replicates()
    key = (8.0, 80.0, 2.2, 1.75) if (8.0, 80.0, 2.2, 1.75) in replicates else next(iter(replicates))
    station = CharacterizationStation(name="mech", url=table_sim.url, properties=["toughness"])
    params = dict(zip(("n", "theta", "r", "t"), key, strict=False))
    docs: list[tuple[str, dict]] = []
    outcome = run_plan(characterize(station, {"job_id": "dev-table", "params": params}),
                       subscribers=[lambda n, d: docs.append((n, d))])
    assert outcome.ok, outcome.exception
    event = next(d for n, d in docs if n == "event")
    assert event["data"]["mech_toughness"] in replicates[key]
    assert event["data"]["mech_note"] == ""
    assert next(d for n, d in docs if n == "descriptor")["data_keys"]["mech_toughness"]["units"] == "J"


def test_off_table_recipe_is_answered_from_nearest_with_a_note(table_sim) -> None:  # noqa: F811
    station = CharacterizationStation(name="mech", url=table_sim.url, properties=["toughness"])
    station.recipe.put(json.dumps({"job_id": "dev-off", "params": {"n": 6, "theta": 0.2, "r": 1.5, "t": 0.69}}))
    station.trigger().wait(20)
    reading = station.read()
    assert "nearest" in reading["mech_note"]["value"]
    assert reading["mech_toughness"]["value"] in table_replicates()[(6.0, 0.0, 1.5, 0.7)]


def test_unknown_candidate_is_rejected_not_measured(crystal_sim) -> None:  # noqa: F811
    robot = SynthesisRobot(name="robot", url=crystal_sim.url, timeout=20)
    outcome = run_plan(synthesize(robot, {"job_id": "dev-bad", "candidate": "perov_nope"}))
    assert outcome.exit_status == "fail"
    assert isinstance(outcome.exception, InstrumentRejected) and "BAD_RECIPE" in str(outcome.exception)
    assert "robot at socket://" in str(outcome.exception)


def test_stop_aborts_the_synthesis_on_the_robot(tmp_path: Path) -> None:
    with simulator(CRYSTAL_WORLD, tmp_path, instrument="robot", time_scale=1.0) as sim:  # 60 s synthesis
        robot = SynthesisRobot(name="robot", url=sim.url, timeout=120)
        status = robot.set({"job_id": "dev-stop", "candidate": "perov_33"})
        deadline = time.monotonic() + 10
        while robot.job("dev-stop")["state"] == "unknown" and time.monotonic() < deadline:
            time.sleep(0.02)
        robot.stop()
        assert robot.job("dev-stop")["state"] == "aborted"
        with pytest.raises(InstrumentError, match="aborted"):
            status.wait(10)  # the Status fails with the robot's word, it does not hang
        # a finished or aborted job id is never synthesized again
        with LineTransport(sim.url, instrument="robot") as line:
            assert line.command("SYNTH START", "dev-stop", {"candidate": "perov_33"}).data["state"] == "aborted"


def test_material_failure_is_not_an_instrument_error(tmp_path: Path) -> None:
    with simulator(CRYSTAL_WORLD, tmp_path, instrument="robot", faults={"failed_synthesis": 1.0}) as sim:
        robot = SynthesisRobot(name="robot", url=sim.url, timeout=20)
        outcome = run_plan(synthesize(robot, {"job_id": "dev-lost", "candidate": "perov_33"}))
        assert outcome.exit_status == "fail"
        assert isinstance(outcome.exception, MaterialFailure) and "sample lost" in str(outcome.exception)
        assert robot.job("dev-lost")["failure"] == "material"


def test_unreachable_instrument_names_itself_and_its_url() -> None:
    robot = SynthesisRobot(name="ghost", url="socket://127.0.0.1:9", timeout=5, retries=1)
    outcome = run_plan(synthesize(robot, {"job_id": "g1", "candidate": "perov_33"}))
    assert isinstance(outcome.exception, InstrumentConnectionError)
    assert "[ghost at socket://127.0.0.1:9]" in str(outcome.exception)


def test_status_timeout_fails_the_run_and_aborts_on_the_robot(tmp_path: Path) -> None:
    with simulator(CRYSTAL_WORLD, tmp_path, instrument="robot", time_scale=1.0) as sim:  # 60 s synthesis
        robot = SynthesisRobot(name="robot", url=sim.url, timeout=0.5)
        started = time.monotonic()
        outcome = run_plan(synthesize(robot, {"job_id": "dev-slow", "candidate": "perov_33"}))
        assert time.monotonic() - started < 10
        assert isinstance(outcome.exception, InstrumentError) and "timeout" in str(outcome.exception)
        deadline = time.monotonic() + 5
        while robot.job("dev-slow")["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert robot.job("dev-slow")["state"] == "aborted"  # DeviceStatus failure called stop()


def test_lazy_package_exports() -> None:
    import devices

    assert devices.SynthesisRobot is SynthesisRobot
