"""Each injected fault: the driver retries or raises as devices/PROTOCOL.md says, in bounded time,
and never hands a garbage value to the RunEngine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from instruments_helpers import CRYSTAL_WORLD, TABLE_WORLD, crystal_truth, journal_records, simulator, table_replicates

from devices.plans import characterize, synthesize_and_characterize
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation
from sdl.exceptions import InstrumentBusy, InstrumentError, InstrumentTimeout
from sdl.lab.runner import run_plan

CANDIDATES = ["perov_60"]


def _devices(url: str, *, line_timeout: float = 0.3, retries: int = 6, busy_timeout: float = 5.0):
    kw = {"line_timeout": line_timeout, "retries": retries, "busy_timeout": busy_timeout, "timeout": 30}
    robot = SynthesisRobot(name="robot", url=url, **kw)
    station = CharacterizationStation(name="station", url=url, properties=["e_form"], units={"e_form": "eV"}, **kw)
    return robot, station


def _events(docs: list[tuple[str, dict]]) -> list[dict]:
    return [d for n, d in docs if n == "event"]


@pytest.mark.parametrize("fault", ["timeout", "garbled", "drop", "busy"])
def test_line_faults_are_retried_and_values_stay_true(fault: str, tmp_path: Path) -> None:
    truth = crystal_truth()
    journal = tmp_path / "journal.jsonl"
    with simulator(CRYSTAL_WORLD, tmp_path, faults={fault: 0.3}, seed=7, journal=journal) as sim:
        robot, station = _devices(sim.url)
        started = time.monotonic()
        for i, cid in enumerate(CANDIDATES):
            docs: list[tuple[str, dict]] = []
            recipe = {"job_id": f"{fault}-{i}", "candidate": cid}
            outcome = run_plan(synthesize_and_characterize(robot, station, recipe),
                               subscribers=[lambda n, d, docs=docs: docs.append((n, d))])
            assert outcome.ok, outcome.exception
            (synth_event, char_event) = _events(docs)
            assert synth_event["data"]["robot_sample_key"] == cid
            assert char_event["data"]["station_e_form"] == truth[cid]["e_form"]
        assert time.monotonic() - started < 60  # bounded (generous: 2 CPUs shared)
        seen = robot.transport.faults + station.transport.faults
        assert seen[fault] > 0, f"no {fault} fault was seen: {dict(seen)}"
    # retried STARTs never synthesized twice
    started_ids = [r["job_id"] for r in journal_records(journal) if r["event"] == "started" and r["kind"] == "synth"]
    assert started_ids == [f"{fault}-0"]


@pytest.mark.parametrize(
    ("fault", "error"),
    [("timeout", InstrumentTimeout), ("garbled", InstrumentError), ("drop", InstrumentError), ("busy", InstrumentBusy)],
)
def test_a_dead_line_fails_the_run_in_bounded_time_with_no_value(fault: str, error: type, tmp_path: Path) -> None:
    with simulator(CRYSTAL_WORLD, tmp_path, faults={fault: 1.0}, instrument="station") as sim:
        _, station = _devices(sim.url, line_timeout=0.2, retries=2, busy_timeout=1.0)
        docs: list[tuple[str, dict]] = []
        started = time.monotonic()
        outcome = run_plan(characterize(station, {"job_id": f"dead-{fault}", "candidate": "perov_33"}),
                           subscribers=[lambda n, d: docs.append((n, d))])
        assert time.monotonic() - started < 20
        assert outcome.exit_status == "fail" and isinstance(outcome.exception, error), repr(outcome.exception)
        assert not _events(docs)  # no event, so no value could be stored
        stop = next(d for n, d in docs if n == "stop")
        assert stop["exit_status"] == "fail" and stop["reason"]


def test_failed_synthesis_stops_before_any_measurement(tmp_path: Path) -> None:
    with simulator(CRYSTAL_WORLD, tmp_path, faults={"failed_synthesis": 1.0}) as sim:
        robot, station = _devices(sim.url)
        docs: list[tuple[str, dict]] = []
        outcome = run_plan(synthesize_and_characterize(robot, station, {"job_id": "lost-1", "candidate": "perov_33"}),
                           subscribers=[lambda n, d: docs.append((n, d))])
        assert outcome.exit_status == "fail" and type(outcome.exception).__name__ == "MaterialFailure"
        assert len([d for n, d in docs if n == "start"]) == 1 and not _events(docs)


def test_drift_is_flagged_and_offset_from_the_truth(tmp_path: Path) -> None:
    truth = table_replicates()
    key = next(iter(truth))
    with simulator(TABLE_WORLD, tmp_path, faults={"drift": 1.0}) as sim:
        station = CharacterizationStation(name="mech", url=sim.url, properties=["toughness"])
        docs: list[tuple[str, dict]] = []
        params = dict(zip(["n", "theta", "r", "t"], key, strict=False))
        outcome = run_plan(characterize(station, {"job_id": "drift-1", "params": params}),
                           subscribers=[lambda n, d: docs.append((n, d))])
        assert outcome.ok
        (event,) = _events(docs)
        assert event["data"]["mech_quality"] == "drift"
        assert event["data"]["mech_toughness"] not in truth[key]
        start = next(d for n, d in docs if n == "start")
        assert start["sdl"]["quality_key"] == "mech_quality"  # the writer stores it as quality="drift"
