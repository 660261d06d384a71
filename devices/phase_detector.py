"""Ophyd ``XRDPhaseDetector``: a computed detector that identifies the phases of the station's last pattern.

Why a device and not a post-processing step: the verdict "did the target form?" must land in the
repository with the measurement it judges, in the same Bluesky event, so that a crash never leaves
a value without its verdict and the document stream stays the single record of what was measured.
The detector reads the raw XRD pattern the :class:`~devices.station.CharacterizationStation`
published (so the station needs ``raw=True``), asks its injected ``references`` callable for the
target's and the competing phases' patterns, and runs :class:`~sdl.xrd.phase_id.PhaseIdentifier`
on its own worker thread (the first analysis of a candidate simulates its references).

``read()`` gives ``{name}_target_fraction`` (share of the diffracted intensity), ``{name}_target_formed``
(1.0 or 0.0), ``{name}_identified`` (phase id, or ``unidentified``), ``{name}_fit_similarity``,
``{name}_fractions`` (JSON: phase id → fraction), ``{name}_summary`` (one line) and
``{name}_quality``: the station's quality flag when the target formed, ``not_target`` otherwise,
which the plan makes the quality of the station's property values (the lab never learns a value
measured on the wrong phase).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ophyd import Device
from ophyd.status import DeviceStatus

from devices.station import CharacterizationStation
from sdl.xrd.phase_id import PhaseAnalysis, PhaseIdentifier, Reference

__all__ = ["NOT_TARGET", "ReferenceSource", "XRDPhaseDetector"]

logger = logging.getLogger(__name__)

NOT_TARGET = "not_target"
"""Quality flag of property values measured on a sample in which the target did not form."""

ReferenceSource = Callable[[str], tuple[Reference, list[Reference]]]
"""Candidate id → (the target's reference, the competing phases' references)."""


class XRDPhaseDetector(Device):  # type: ignore[misc] # ophyd ships no type information
    """Phase identification of the XRD pattern a station just measured.

    Args:
        prefix: Unused (Ophyd convention).
        name: Device name (prefix of every data key).
        station: The station whose last reading holds the pattern (built with ``raw=True``).
        references: Candidate id → target and competing-phase references.
        identifier: The analysis (threshold, peak width, strain range).
        timeout: Seconds an analysis may take before its Status fails.
    """

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        station: CharacterizationStation,
        references: ReferenceSource,
        identifier: PhaseIdentifier,
        timeout: float = 120.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(prefix, name=name, **kwargs)
        if not station.raw:
            raise ValueError(f"{name}: station {station.name} must stream its raw pattern (raw=True)")
        self.station = station
        self.references = references
        self.identifier = identifier
        self.timeout = timeout
        self.last: PhaseAnalysis | None = None
        self._reading = self._empty_reading()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-analysis")

    # -- keys -----------------------------------------------------------------------------
    def key(self, field: str) -> str:
        """Data key of one output (``target_fraction``, ``target_formed``, ``identified``, ...)."""
        return f"{self.name}_{field}"

    @property
    def quality_key(self) -> str:
        """Data key of the quality the station's property values take (``not_target`` when not formed)."""
        return self.key("quality")

    def measurement_map(self) -> dict[str, dict[str, Any]]:
        """The detector's ``md["sdl"]["measurements"]`` entries: always ``ok`` quality (an explicit ``None`` key)."""
        return {
            self.key("target_fraction"): {"property": "target_phase_fraction", "unit": "", "uncertainty_key": None,
                                          "quality_key": None},
            self.key("target_formed"): {"property": "target_formed", "unit": "", "uncertainty_key": None,
                                        "quality_key": None},
        }

    def _empty_reading(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {
            self.key("target_fraction"): {"value": math.nan, "timestamp": now},
            self.key("target_formed"): {"value": math.nan, "timestamp": now},
            self.key("fit_similarity"): {"value": math.nan, "timestamp": now},
            self.key("identified"): {"value": "", "timestamp": now},
            self.key("fractions"): {"value": "{}", "timestamp": now},
            self.key("summary"): {"value": "", "timestamp": now},
            self.quality_key: {"value": "none", "timestamp": now},
        }

    # -- bluesky protocol -----------------------------------------------------------------
    def trigger(self) -> DeviceStatus:
        """Analyse the station's current reading; the Status ends when the verdict is published."""
        status = DeviceStatus(self, timeout=self.timeout)
        with self._lock:
            self._reading = self._empty_reading()
            self.last = None
        self._worker.submit(self._run, status)
        return status

    def _run(self, status: DeviceStatus) -> None:
        try:
            analysis, quality = self._analyse()
            now = time.time()
            reading: dict[str, dict[str, Any]] = {
                self.key("target_fraction"): {"value": float(analysis.target_fraction), "timestamp": now},
                self.key("target_formed"): {"value": 1.0 if analysis.target_formed else 0.0, "timestamp": now},
                self.key("fit_similarity"): {"value": float(analysis.fit_similarity), "timestamp": now},
                self.key("identified"): {"value": analysis.identified, "timestamp": now},
                self.key("fractions"): {"value": json.dumps(analysis.fractions, sort_keys=True), "timestamp": now},
                self.key("summary"): {"value": analysis.summary(), "timestamp": now},
                self.quality_key: {"value": quality, "timestamp": now},
            }
            with self._lock:
                self._reading, self.last = reading, analysis
            logger.info("%s: %s", self.name, analysis.summary())
            status.set_finished()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the Status
            if not status.done:
                status.set_exception(exc)

    def _analyse(self) -> tuple[PhaseAnalysis, str]:
        station = self.station
        reading = station.read()
        recipe = json.loads(station.recipe.get() or "{}")
        candidate = recipe.get("candidate") if isinstance(recipe, dict) else None
        if not isinstance(candidate, str):
            raise ValueError(f"{self.name}: phase identification needs recipe.candidate (a crystal id), got {recipe!r}")
        two_theta = reading[f"{station.name}_xrd_two_theta"]["value"]
        intensity = reading[f"{station.name}_xrd_intensity"]["value"]
        target, competitors = self.references(candidate)
        analysis = self.identifier.identify(two_theta, intensity, target, competitors)
        station_quality = str(reading[station.quality_key]["value"])
        return analysis, station_quality if analysis.target_formed else NOT_TARGET

    def read(self) -> OrderedDict[str, dict[str, Any]]:
        """The last verdict (NaN / empty before any)."""
        out: OrderedDict[str, dict[str, Any]] = super().read()
        with self._lock:
            out.update({k: dict(v) for k, v in self._reading.items()})
        return out

    def describe(self) -> OrderedDict[str, dict[str, Any]]:
        """Data keys with dtype, shape and source."""
        out: OrderedDict[str, dict[str, Any]] = super().describe()
        source = f"phase identification of {self.station.name}"
        for field in ("target_fraction", "target_formed", "fit_similarity"):
            out[self.key(field)] = {"source": source, "dtype": "number", "shape": [], "units": ""}
        for field in ("identified", "fractions", "summary", "quality"):
            out[self.key(field)] = {"source": source, "dtype": "string", "shape": []}
        return out

    @property
    def hints(self) -> dict[str, list[str]]:
        """Best-effort-callback fields: the target fraction and the verdict."""
        return {"fields": [self.key("target_fraction"), self.key("target_formed")]}

    def close(self) -> None:
        """Stop the analysis worker."""
        self._worker.shutdown(wait=False, cancel_futures=True)
