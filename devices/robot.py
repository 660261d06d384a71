"""Ophyd ``SynthesisRobot``: ``set(recipe)`` starts a synthesis and returns a Status at once.

The recipe's ``job_id`` is the experiment's idempotency key: the robot never synthesizes a job id
twice, so the driver may repeat ``START`` after a lost reply, and a restarted client can ask what
became of a job (:func:`reconcile`). One worker thread per robot keeps one job in flight.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ophyd import Component as Cpt
from ophyd import Signal
from ophyd.status import DeviceStatus

from devices.line_device import LineDevice
from devices.transport import FaultCallback, LineTransport
from sdl.exceptions import InstrumentError, InstrumentProtocolError, MaterialFailure

__all__ = ["SynthesisRobot"]

logger = logging.getLogger(__name__)


class SynthesisRobot(LineDevice):
    """A synthesis robot on an SDL/1 line.

    Args:
        prefix: Unused (Ophyd convention).
        name: Device name (also the instrument name in errors).
        url: ``serial_for_url`` URL of the robot.
        timeout: Seconds a synthesis may take before its Status fails (finite on purpose).
        poll_interval: Seconds between ``SYNTH STATUS`` polls.
        line_timeout: Seconds to wait for one reply line.
        retries: Transport retries (see ``devices/PROTOCOL.md``).
        busy_timeout: Seconds to wait while the robot answers ``BUSY``.
        on_fault: Told about every line fault (kind, message).
        transport: Use this transport instead of building one.
    """

    verb = "SYNTH"

    job_id = Cpt(Signal, value="", kind="normal")
    state = Cpt(Signal, value="idle", kind="hinted")
    sample = Cpt(Signal, value="", kind="normal")
    sample_key = Cpt(Signal, value="", kind="normal")
    note = Cpt(Signal, value="", kind="normal")

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        url: str,
        timeout: float = 600.0,
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

    def set(self, recipe: dict[str, Any]) -> DeviceStatus:
        """Start synthesizing ``recipe`` (a dict with ``job_id`` and ``candidate`` or ``params``).

        Returns:
            A Status that finishes when the robot reports the sample done, or fails with
            :class:`MaterialFailure` (sample lost) or an :class:`InstrumentError`.
        """
        if not isinstance(recipe, dict):
            raise TypeError(f"{self.name}: recipe must be a dict, got {type(recipe).__name__}")
        job_id = str(recipe.get("job_id") or f"{self.name}-{uuid.uuid4().hex[:12]}")
        if "job_id" not in recipe:
            logger.warning("%s: recipe has no job_id; using %s (not crash-safe)", self.name, job_id)
        body = {k: v for k, v in recipe.items() if k != "job_id"}
        self.job_id.put(job_id)
        self.state.put("starting")
        self.sample.put("")
        self.sample_key.put("")
        self.note.put("")
        return self._submit(job_id, body, self._run)

    def _run(self, job_id: str, body: dict[str, Any], status: DeviceStatus) -> None:
        try:
            result = self._job_result(job_id, body, status, on_running=lambda: self.state.put("running"))
            if result is None:
                return
            state = result.get("state")
            self.state.put(str(state))
            self._release()
            if state == "done":
                sample = result.get("sample") or {}
                self.sample.put(str(sample.get("id", "")))
                self.sample_key.put(str(sample.get("key", "")))
                self.note.put(str(result.get("note") or ""))
                status.set_finished()
            elif state == "failed" and result.get("failure") == "material":
                status.set_exception(MaterialFailure(str(result.get("error")), instrument=self.name))
            elif state in ("failed", "aborted"):
                status.set_exception(InstrumentError(
                    f"synthesis {job_id} {state}: {result.get('error')}", instrument=self.name, url=self.url))
            else:
                status.set_exception(InstrumentProtocolError(
                    f"synthesis {job_id}: unexpected state {state!r}", instrument=self.name, url=self.url))
        except Exception as exc:  # noqa: BLE001 - every failure must reach the Status
            self._release()
            self.state.put("error")
            if not status.done:
                status.set_exception(exc)

    def _aborted(self) -> None:
        self.state.put("aborted")
