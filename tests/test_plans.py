"""Plans: run shape, md["sdl"] convention (docs/ARCHITECTURE.md), the runner from worker threads."""

from __future__ import annotations

import json
import threading
import time

import event_model
import pytest
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from instruments_helpers import crystal_sim, crystal_truth  # noqa: F401 - fixtures

from devices.phase_detector import XRDPhaseDetector
from devices.plans import characterize, synthesize, synthesize_and_characterize
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation
from sdl.lab.runner import run_plan


def _devices(url: str) -> tuple[SynthesisRobot, CharacterizationStation]:
    return (SynthesisRobot(name="robot", url=url, timeout=30),
            CharacterizationStation(name="station", url=url, properties=["e_form", "gap_gllbsc"]))


def test_synthesize_and_characterize_makes_two_valid_runs_with_sdl_metadata(crystal_sim) -> None:  # noqa: F811
    robot, station = _devices(crystal_sim.url)
    recipe = {"job_id": "plan-1", "candidate": "perov_60"}
    docs: list[tuple[str, dict]] = []
    outcome = run_plan(
        synthesize_and_characterize(robot, station, recipe, md={"sdl": {"campaign_id": 3, "experiment_id": 17},
                                                               "operator": "ci"}),
        subscribers=[lambda n, d: docs.append((n, d))],
    )
    assert outcome.ok and len(outcome.run_uids) == 2
    assert outcome.plan_result == outcome.run_uids
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    starts = [d for n, d in docs if n == "start"]
    assert [s["plan_name"] for s in starts] == ["synthesize", "characterize"]
    synth, char = (s["sdl"] for s in starts)
    assert synth == {"campaign_id": 3, "experiment_id": 17, "recipe": recipe, "instrument": "robot",
                     "measurements": {}, "quality_key": None}
    assert char["instrument"] == "station" and char["quality_key"] == "station_quality"
    assert char["measurements"]["station_e_form"] == {"property": "e_form", "unit": "eV",
                                                      "uncertainty_key": "station_e_form_std"}
    assert all(s["operator"] == "ci" for s in starts)
    event = [d for n, d in docs if n == "event"][-1]
    for key, spec in char["measurements"].items():
        assert event["data"][key] == crystal_truth()["perov_60"][spec["property"]]
    assert [d["exit_status"] for n, d in docs if n == "stop"] == ["success", "success"]


def test_run_plan_is_safe_from_worker_threads(crystal_sim) -> None:  # noqa: F811
    truth = crystal_truth()
    cids = sorted(truth)[10:14]
    results: dict[str, float] = {}
    errors: list[BaseException] = []

    def worker(i: int, cid: str) -> None:
        try:
            robot, station = _devices(crystal_sim.url)
            docs: list[tuple[str, dict]] = []
            outcome = run_plan(synthesize_and_characterize(robot, station, {"job_id": f"thread-{i}", "candidate": cid}),
                               subscribers=[lambda n, d: docs.append((n, d))])
            assert outcome.ok, outcome.exception
            results[cid] = [d for n, d in docs if n == "event"][-1]["data"]["station_e_form"]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(cids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == {c: truth[c]["e_form"] for c in cids}


def test_one_engine_per_key_lets_instruments_work_at_once(tmp_path) -> None:
    from instruments_helpers import CRYSTAL_WORLD, simulator

    from devices.plans import characterize, synthesize
    from sdl.lab.runner import get_run_engine

    with simulator(CRYSTAL_WORLD, tmp_path, time_scale=0.1) as sim:  # synthesis 6 s, measurement 2 s: margin
        robot, station = _devices(sim.url)
        finished: list[str] = []

        def run(key: str, plan) -> None:
            outcome = run_plan(plan, key=key)
            assert outcome.ok, outcome.exception
            finished.append(key)

        slow_plan = synthesize(robot, {"job_id": "keyed-1", "candidate": "perov_33"})
        slow = threading.Thread(target=run, args=("robot", slow_plan))
        slow.start()
        deadline = time.monotonic() + 20
        while robot.state.get() != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        run("station", characterize(station, {"job_id": "keyed-1", "candidate": "perov_33"}))
        robot_still_busy = slow.is_alive()
        slow.join(60)
        assert finished == ["station", "robot"]  # the measurement did not wait for the synthesis
        assert robot_still_busy
        assert get_run_engine("robot") is not get_run_engine("station")


def _stub_synthesize(robot, recipe, md):
    """The synthesis plan as bluesky's stubs compose it (the reference the plain generator must match)."""
    @bpp.run_decorator(md=md)
    def inner():
        yield from bps.abs_set(robot, recipe, wait=True)
        yield from bps.trigger_and_read([robot])

    return (yield from inner())


def _stub_characterize(station, recipe, md, phases=None):
    @bpp.run_decorator(md=md)
    def inner():
        yield from bps.abs_set(station.recipe, json.dumps(recipe, sort_keys=True), wait=True)
        if phases is None:
            yield from bps.trigger_and_read([station])
            return
        yield from bps.trigger(station, wait=True)
        yield from bps.trigger(phases, wait=True)
        yield from bps.create("primary")
        yield from bps.read(station)
        yield from bps.read(phases)
        yield from bps.save()

    return (yield from inner())


def _messages(plan, fail_at: str | None = None) -> list[tuple]:
    """Drive a plan as a RunEngine would (``open_run`` answers a uid), groups renamed in order of use.

    ``fail_at``: throw an error into the plan at the first message with that command.
    """
    groups: dict[object, str] = {}
    out: list[tuple] = []
    reply: object = None
    throw: BaseException | None = None
    while True:
        try:
            msg = plan.throw(throw) if throw is not None else plan.send(reply)
        except StopIteration as stop:
            out.append(("return", stop.value))
            return out
        except RuntimeError as exc:
            out.append(("raised", str(exc)))
            return out
        throw = None
        kwargs = dict(msg.kwargs)
        if kwargs.get("group") is not None:
            kwargs["group"] = groups.setdefault(kwargs["group"], f"g{len(groups)}")
        out.append((msg.command, msg.obj, msg.args, kwargs))
        reply = "run-uid" if msg.command == "open_run" else None
        if msg.command == fail_at:
            throw, fail_at = RuntimeError(f"{msg.command} failed"), None


@pytest.mark.parametrize("fail_at", [None, "wait", "read"])
def test_plans_send_the_messages_of_the_bluesky_stubs(crystal_sim, fail_at) -> None:  # noqa: F811
    """The plain generators (no ``Plan`` wrapper, no stack formatted per stub) make the same runs, failed ones too."""
    robot, station = _devices(crystal_sim.url)
    raw = CharacterizationStation(name="station", url=crystal_sim.url, properties=["e_form"], raw=True)
    phases = XRDPhaseDetector(name="station_phases", station=raw, references=lambda key: (None, []),
                              identifier=None)
    recipe = {"job_id": "msgs-1", "candidate": "perov_60"}
    md = {"sdl": {"campaign_id": 1, "experiment_id": 2}, "operator": "ci"}
    cases = [
        (synthesize(robot, recipe, md=md), lambda run_md: _stub_synthesize(robot, recipe, run_md)),
        (characterize(station, recipe, md=md), lambda run_md: _stub_characterize(station, recipe, run_md)),
        (characterize(raw, recipe, md=md, phases=phases),
         lambda run_md: _stub_characterize(raw, recipe, run_md, phases)),
    ]
    for ours, stubs in cases:
        mine = _messages(ours, fail_at)
        assert mine[0][0] == "open_run" and mine[0][3]["operator"] == "ci"
        assert mine == _messages(stubs(mine[0][3]), fail_at)
        close = next(m for m in mine if m[0] == "close_run")
        assert close[3] == ({"exit_status": "fail", "reason": f"{fail_at} failed"} if fail_at
                            else {"exit_status": None, "reason": None})
        assert mine[-1] == (("raised", f"{fail_at} failed") if fail_at else ("return", "run-uid"))
    for device in (robot, station, raw, phases):
        device.close()
