"""Bluesky plans for one experiment: plain generators, one run per instrument step.

Every run's start document carries ``md["sdl"]`` (docs/ARCHITECTURE.md): campaign id, experiment
id, recipe, the instrument that ran the step and, for characterization runs, which event data
keys are measurements and which key holds the quality flag. Caller metadata (``md``) is merged on
top, and ``md["sdl"]`` entries given by the caller (campaign and experiment ids) are kept.
"""

from __future__ import annotations

import json
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import MsgGenerator

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
    station: CharacterizationStation, recipe: dict[str, Any], *, md: dict[str, Any] | None = None
) -> MsgGenerator[str]:
    """One run: the station measures the material of ``recipe``; one event with the values."""
    _md = {
        "plan_name": "characterize",
        "plan_args": {"station": repr(station.name), "recipe": json.dumps(recipe, sort_keys=True)},
        "detectors": [station.name],
        "hints": {"dimensions": [(["time"], "primary")]},
    }
    _md.update(_sdl_md(md, recipe, station.name, measurements=station.measurement_map(),
                       quality_key=station.quality_key))

    @bpp.run_decorator(md=_md)  # type: ignore[untyped-decorator] # bluesky's decorators are untyped
    def inner() -> MsgGenerator[None]:
        yield from bps.abs_set(station.recipe, json.dumps(recipe, sort_keys=True), wait=True)
        yield from bps.trigger_and_read([station])

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
