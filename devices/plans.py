"""Bluesky plans for one experiment: plain generators, one run per instrument step.

Every run's start document carries ``md["sdl"]`` (docs/ARCHITECTURE.md): campaign id, experiment
id, recipe, the instrument that ran the step and, for characterization runs, which event data
keys are measurements and which key holds the quality flag. Caller metadata (``md``) is merged on
top, and ``md["sdl"]`` entries given by the caller (campaign and experiment ids) are kept.

With an :class:`~devices.phase_detector.XRDPhaseDetector`, ``characterize`` analyses the XRD
pattern the station streamed and puts the verdict (target phase fraction, target formed) in the
same event as the station's values, whose quality then comes from the detector: a property value
measured on a sample in which the target did not form is flagged ``not_target``.

The plans yield :class:`~bluesky.utils.Msg` objects themselves, through the small helpers below,
which send the same messages as the ``bluesky.plan_stubs`` / ``bluesky.preprocessors`` they are
named after (tests/test_plans.py compares the two): bluesky 1.15 wraps every stub call in a
``Plan`` that formats the whole call stack (``traceback.format_stack``) in case it is never
iterated, and inside a Prefect task that stack is deep; 18 stub calls per experiment made it a
few ms of CPU each.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from bluesky.protocols import Readable, Triggerable
from bluesky.utils import Msg, MsgGenerator, RunEngineControlException

from devices.phase_detector import XRDPhaseDetector
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation

__all__ = ["synthesize", "characterize", "synthesize_and_characterize"]


def _sdl_md(md: dict[str, Any] | None, recipe: dict[str, Any], instrument: str, **extra: Any) -> dict[str, Any]:
    caller = dict(md or {})
    sdl = {"campaign_id": None, "experiment_id": None, **(caller.get("sdl") or {})}
    sdl.update({"recipe": dict(recipe), "instrument": instrument, **extra})
    caller["sdl"] = sdl
    return caller


def _run(md: dict[str, Any], body: MsgGenerator[None]) -> MsgGenerator[str]:
    """``bpp.run_wrapper``: open a run, run ``body``, close the run (``fail`` and re-raise on an error)."""
    uid = yield Msg("open_run", **md)
    try:
        yield from body
    except GeneratorExit:
        raise
    except RunEngineControlException as exc:  # a stop or an abort: the subclass names the exit status
        yield Msg("close_run", exit_status=getattr(exc, "exit_status", "abort"), reason=None)
        raise
    except Exception as exc:
        yield Msg("close_run", exit_status="fail", reason=str(exc))
        raise
    yield Msg("close_run", exit_status=None, reason=None)
    return str(uid)


def _set_and_wait(obj: Any, value: Any) -> MsgGenerator[None]:
    """``bps.abs_set(obj, value, wait=True)``."""
    group = str(uuid.uuid4())
    yield Msg("set", obj, value, group=group)
    yield Msg("wait", None, group=group)


def _trigger_and_wait(obj: Triggerable) -> MsgGenerator[None]:
    """``bps.trigger(obj, wait=True)``."""
    yield Msg("trigger", obj, group=None)
    yield Msg("wait", None, group=None)


def _trigger_and_read(devices: Sequence[Readable[Any]]) -> MsgGenerator[None]:
    """``bps.trigger_and_read(devices)`` for devices that may be re-triggered (no ``rewindable`` signal).

    One event in the ``primary`` stream; a failed read drops the event and re-raises.
    """
    group = f"trigger-{str(uuid.uuid4())[:6]}"
    triggered = [device for device in devices if isinstance(device, Triggerable)]
    for device in triggered:
        yield Msg("trigger", device, group=group)
    if triggered:
        yield Msg("wait", None, group=group, error_on_timeout=True, timeout=None, watch=())
    yield Msg("create", name="primary")
    try:
        for obj in devices:
            yield Msg("read", obj)
    except GeneratorExit:
        raise
    except Exception:
        yield Msg("drop")
        raise
    yield Msg("save")


def synthesize(robot: SynthesisRobot, recipe: dict[str, Any], *, md: dict[str, Any] | None = None) -> MsgGenerator[str]:
    """One run: the robot synthesizes ``recipe`` (with its ``job_id``); one event of its state.

    Returns:
        The run's uid. A failed synthesis raises (``FailedStatus`` carrying ``MaterialFailure`` or
        an ``InstrumentError``); the run then closes with ``exit_status="fail"``.
    """
    _md = {
        "plan_name": "synthesize",
        "plan_args": {"robot": repr(robot.name), "recipe": json.dumps(recipe, sort_keys=True)},
        "detectors": [robot.name],
        "hints": {"dimensions": [(["time"], "primary")]},
    }
    _md.update(_sdl_md(md, recipe, robot.name, measurements={}, quality_key=None))

    def inner() -> MsgGenerator[None]:
        yield from _set_and_wait(robot, recipe)
        yield from _trigger_and_read([robot])

    return (yield from _run(_md, inner()))


def characterize(
    station: CharacterizationStation,
    recipe: dict[str, Any],
    *,
    md: dict[str, Any] | None = None,
    phases: XRDPhaseDetector | None = None,
) -> MsgGenerator[str]:
    """One run: the station measures the material of ``recipe``; one event with the values.

    Args:
        station: The station.
        recipe: Candidate (or params) and job ids.
        md: Caller metadata (``md["sdl"]`` ids are kept).
        phases: Identify the phases of the streamed XRD pattern and record the verdict in the
            same event (the station must have ``raw=True``).
    """
    measurements = station.measurement_map()
    detectors = [station.name]
    if phases is not None:
        measurements = {k: {**v, "quality_key": phases.quality_key} for k, v in measurements.items()}
        measurements.update(phases.measurement_map())
        detectors.append(phases.name)
    _md = {
        "plan_name": "characterize",
        "plan_args": {"station": repr(station.name), "recipe": json.dumps(recipe, sort_keys=True)},
        "detectors": detectors,
        "hints": {"dimensions": [(["time"], "primary")]},
    }
    _md.update(_sdl_md(md, recipe, station.name, measurements=measurements, quality_key=station.quality_key))

    def inner() -> MsgGenerator[None]:
        yield from _set_and_wait(station.recipe, json.dumps(recipe, sort_keys=True))
        if phases is None:
            yield from _trigger_and_read([station])
            return
        # The detector analyses what the station published: trigger one after the other, then
        # read both into one event, so the verdict and the values it judges are never apart.
        yield from _trigger_and_wait(station)
        yield from _trigger_and_wait(phases)
        yield Msg("create", name="primary")
        yield Msg("read", station)
        yield Msg("read", phases)
        yield Msg("save")

    return (yield from _run(_md, inner()))


def synthesize_and_characterize(
    robot: SynthesisRobot,
    station: CharacterizationStation,
    recipe: dict[str, Any],
    *,
    md: dict[str, Any] | None = None,
) -> MsgGenerator[tuple[str, str]]:
    """Two runs: synthesize, then characterize the same recipe. Returns both run uids.

    A failed synthesis stops the plan before any measurement is taken.
    """
    synth_uid = yield from synthesize(robot, recipe, md=md)
    char_uid = yield from characterize(station, recipe, md=md)
    return synth_uid, char_uid
