"""Ophyd ``CharacterizationStation``: ``trigger()`` measures the current recipe's material.

The plan writes the recipe into the ``recipe`` signal, triggers, then reads. ``read()`` gives one
data key per property (``{name}_{property}``), its standard uncertainty (``{name}_{property}_std``),
the instrument's quality flag (``{name}_quality``: ``ok`` or ``drift``), a note (off-table answers)
and, with ``raw=True``, the raw pattern as array keys (``{name}_xrd_two_theta``,
``{name}_xrd_intensity``). Values are only published after the whole reply checked out, so a
failed trigger never leaves a half-read value behind.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from ophyd import Component as Cpt
from ophyd import Signal
from ophyd.status import DeviceStatus

from devices.line_device import LineDevice
from devices.transport import FaultCallback, LineTransport
from sdl.exceptions import InstrumentError, InstrumentProtocolError

__all__ = ["CharacterizationStation"]

logger = logging.getLogger(__name__)


class CharacterizationStation(LineDevice):
    """A characterization station on an SDL/1 line.

    Args:
        prefix: Unused (Ophyd convention).
        name: Device name (prefix of every data key; instrument name in errors).
        url: ``serial_for_url`` URL of the station.
        properties: The properties to read (columns of the world, e.g. ``["e_form"]``).
        units: Units per property; default: asked from the station (``STATUS?``).
        raw: Also fetch the raw pattern (``MEASURE RAW``) and expose it as array keys.
        raw_timeout: Seconds to wait for the first line of a raw-data reply (computed on demand).
        timeout: Seconds a measurement may take before its Status fails.
        poll_interval: Seconds between ``MEASURE STATUS`` polls.
        line_timeout: Seconds to wait for one reply line.
        retries: Transport retries (see ``devices/PROTOCOL.md``).
        busy_timeout: Seconds to wait while the station answers ``BUSY``.
        on_fault: Told about every line fault (kind, message).
        transport: Use this transport instead of building one.
    """

    verb = "MEASURE"

    job_id = Cpt(Signal, value="", kind="normal")
    recipe = Cpt(Signal, value="{}", kind="omitted")

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        url: str,
        properties: list[str],
        units: dict[str, str] | None = None,
        raw: bool = False,
        raw_timeout: float = 30.0,
        timeout: float = 300.0,
        poll_interval: float = 0.05,
        line_timeout: float = 2.0,
        retries: int = 3,
        busy_timeout: float = 30.0,
        on_fault: FaultCallback | None = None,
        transport: LineTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            prefix, name=name, url=url, timeout=timeout, poll_interval=poll_interval, line_timeout=line_timeout,
            retries=retries, busy_timeout=busy_timeout, on_fault=on_fault, transport=transport, **kwargs,
        )
        if not properties:
            raise ValueError(f"{name}: properties must name at least one property")
        self.properties = list(properties)
        self._units = dict(units) if units is not None else None
        self.raw = raw
        self.raw_timeout = raw_timeout
        self._reading: dict[str, dict[str, Any]] = self._empty_reading()
        self._lock = threading.Lock()  # guards the published reading

    # -- keys -----------------------------------------------------------------------------
    def key(self, prop: str) -> str:
        """Data key of a property's value."""
        return f"{self.name}_{prop}"

    @property
    def quality_key(self) -> str:
        """Data key of the quality flag."""
        return f"{self.name}_quality"

    @property
    def units(self) -> dict[str, str]:
        """Units per property (asked from the station once when not given)."""
        if self._units is None:
            reported = (self.transport.command("STATUS?").data or {}).get("properties") or {}
            self._units = {p: str(reported.get(p, "")) for p in self.properties}
        return self._units

    def measurement_map(self) -> dict[str, dict[str, Any]]:
        """The ``md["sdl"]["measurements"]`` entry of this station (see docs/ARCHITECTURE.md)."""
        return {
            self.key(p): {"property": p, "unit": self.units.get(p, ""), "uncertainty_key": f"{self.key(p)}_std"}
            for p in self.properties
        }

    def _empty_reading(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for p in self.properties:
            out[self.key(p)] = {"value": math.nan, "timestamp": now}
            out[f"{self.key(p)}_std"] = {"value": math.nan, "timestamp": now}
        out[self.quality_key] = {"value": "none", "timestamp": now}
        out[f"{self.name}_note"] = {"value": "", "timestamp": now}
        if self.raw:
            out[f"{self.name}_xrd_two_theta"] = {"value": [], "timestamp": now}
            out[f"{self.name}_xrd_intensity"] = {"value": [], "timestamp": now}
        return out

    # -- bluesky protocol -----------------------------------------------------------------
    def trigger(self) -> DeviceStatus:
        """Measure the material of the current ``recipe`` signal; the Status ends with the result."""
        try:
            recipe = json.loads(self.recipe.get() or "{}")
        except ValueError as exc:
            raise ValueError(f"{self.name}: recipe signal is not JSON: {exc}") from exc
        if not isinstance(recipe, dict) or not ({"candidate", "params"} & set(recipe)):
            raise ValueError(f"{self.name}: recipe must name a candidate or params, got {recipe!r}")
        base = str(recipe.get("job_id") or self.name)
        job_id = str(recipe.get("measure_job_id") or f"{base}.m{uuid.uuid4().hex[:8]}")[:128]
        body = {k: v for k, v in recipe.items() if k not in ("job_id", "measure_job_id")}
        with self._lock:
            self._reading = self._empty_reading()
        self.job_id.put(job_id)
        return self._submit(job_id, body, self._run)

    def _run(self, job_id: str, body: dict[str, Any], status: DeviceStatus) -> None:
        try:
            result = self._job_result(job_id, body, status)
            if result is None:
                return
            if result.get("state") != "done":
                raise InstrumentError(f"measurement {job_id} {result.get('state')}: {result.get('error')}",
                                      instrument=self.name, url=self.url)
            reading = self._reading_from(job_id, result)
            if self.raw:
                _, rows = self.transport.stream("MEASURE RAW", job_id, timeout=self.raw_timeout)
                if any(len(r) < 2 for r in rows):
                    raise InstrumentProtocolError("raw rows need two columns", instrument=self.name, url=self.url)
                now = time.time()
                reading[f"{self.name}_xrd_two_theta"] = {"value": [r[0] for r in rows], "timestamp": now}
                reading[f"{self.name}_xrd_intensity"] = {"value": [r[1] for r in rows], "timestamp": now}
            with self._lock:
                self._reading = reading
            self._release()
            status.set_finished()
        except Exception as exc:  # noqa: BLE001 - every failure must reach the Status
            self._release()
            if not status.done:
                status.set_exception(exc)

    def _reading_from(self, job_id: str, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
        values = result.get("values") or {}
        stds = result.get("std") or {}
        now = time.time()
        reading = self._empty_reading()
        for p in self.properties:
            value = values.get(p)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InstrumentProtocolError(f"measurement {job_id}: no finite value for {p!r} in {sorted(values)}",
                                              instrument=self.name, url=self.url)
            std = stds.get(p, math.nan)
            reading[self.key(p)] = {"value": float(value), "timestamp": now}
            reading[f"{self.key(p)}_std"] = {"value": float(std) if isinstance(std, int | float) else math.nan,
                                            "timestamp": now}
        quality = result.get("quality")
        if quality not in ("ok", "drift"):
            raise InstrumentProtocolError(f"measurement {job_id}: unknown quality {quality!r}",
                                          instrument=self.name, url=self.url)
        reading[self.quality_key] = {"value": quality, "timestamp": now}
        reading[f"{self.name}_note"] = {"value": str(result.get("note") or ""), "timestamp": now}
        return reading

    def read(self) -> OrderedDict[str, dict[str, Any]]:
        """Ophyd signals plus the last measurement (NaN / ``"none"`` before any)."""
        out: OrderedDict[str, dict[str, Any]] = super().read()
        with self._lock:
            out.update({k: dict(v) for k, v in self._reading.items()})
        return out

    def describe(self) -> OrderedDict[str, dict[str, Any]]:
        """Data keys with dtype, shape, units and source."""
        out = super().describe()
        source = f"SDL/1 {self.url}"
        for p in self.properties:
            unit = self.units.get(p, "")
            out[self.key(p)] = {"source": source, "dtype": "number", "shape": [], "units": unit}
            out[f"{self.key(p)}_std"] = {"source": source, "dtype": "number", "shape": [], "units": unit}
        out[self.quality_key] = {"source": source, "dtype": "string", "shape": []}
        out[f"{self.name}_note"] = {"source": source, "dtype": "string", "shape": []}
        if self.raw:
            with self._lock:
                n = len(self._reading.get(f"{self.name}_xrd_two_theta", {}).get("value", []))
            out[f"{self.name}_xrd_two_theta"] = {"source": source, "dtype": "array", "shape": [n], "units": "deg"}
            out[f"{self.name}_xrd_intensity"] = {"source": source, "dtype": "array", "shape": [n], "units": "%"}
        return out  # type: ignore[no-any-return] # ophyd's describe() is untyped

    @property
    def hints(self) -> dict[str, list[str]]:
        """Best-effort-callback fields: the property values."""
        return {"fields": [self.key(p) for p in self.properties]}
