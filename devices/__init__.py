"""Instrument drivers: the SDL/1 line protocol, a pyserial transport, Ophyd devices and Bluesky plans.

Submodules are imported lazily so that the simulators (which only need :mod:`devices.protocol`)
start without importing ophyd and bluesky.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LineTransport",
    "SynthesisRobot",
    "CharacterizationStation",
    "XRDPhaseDetector",
    "synthesize",
    "characterize",
    "synthesize_and_characterize",
]

_WHERE = {
    "LineTransport": "devices.transport",
    "SynthesisRobot": "devices.robot",
    "CharacterizationStation": "devices.station",
    "XRDPhaseDetector": "devices.phase_detector",
    "synthesize": "devices.plans",
    "characterize": "devices.plans",
    "synthesize_and_characterize": "devices.plans",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'devices' has no attribute {name!r}")
