"""Bluesky plans for one experiment: plain generators, one run per instrument step.

Every run's start document carries ``md["sdl"]`` (docs/ARCHITECTURE.md): campaign id, experiment
id, recipe, the instrument that ran the step and, for characterization runs, which event data
keys are measurements and which key holds the quality flag. Caller metadata (``md``) is merged on
top, and ``md["sdl"]`` entries given by the caller (campaign and experiment ids) are kept.

With an :class:`~devices.phase_detector.XRDPhaseDetector`, ``characterize`` analyses the XRD
pattern the station streamed and puts the verdict (target phase fraction, target formed) in the
same event as the station's values, whose quality then comes from the detector: a property value
measured on a sample in which the target did not form is flagged ``not_target``.
"""

from __future__ import annotations

import json
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import MsgGenerator

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

    @bpp.run_decorator(md=_md)  # type: ignore[untyped-decorator] # bluesky's decorators are untyped
    def inner() -> MsgGenerator[None]:
        yield from bps.abs_set(robot, recipe, wait=True)
        yield from bps.trigger_and_read([robot])

    uid = yield from inner()
    return str(uid)


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

    @bpp.run_decorator(md=_md)  # type: ignore[untyped-decorator] # bluesky's decorators are untyped
    def inner() -> MsgGenerator[None]:
        yield from bps.abs_set(station.recipe, json.dumps(recipe, sort_keys=True), wait=True)
        if phases is None:
            yield from bps.trigger_and_read([station])
            return
        # The detector analyses what the station published: trigger one after the other, then
        # read both into one event, so the verdict and the values it judges are never apart.
        yield from bps.trigger(station, wait=True)
        yield from bps.trigger(phases, wait=True)
        yield from bps.create("primary")
        yield from bps.read(station)
        yield from bps.read(phases)
        yield from bps.save()

    uid = yield from inner()
    return str(uid)


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
