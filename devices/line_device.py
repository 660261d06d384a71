"""What every SDL/1 instrument device shares: one line, one worker thread, one job in flight.

The robot and the station differ in what a job means (a synthesis, a measurement) but not in how a
job runs on the wire: ``<VERB> START`` with the client's job id, ``<VERB> STATUS`` polls while it
runs, ``<VERB> RESULT`` at the end, and ``<VERB> ABORT`` from ``stop()``. That lifecycle lives here
once, so a fix to it (a poll bound, an abort rule) reaches both devices.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from ophyd import Device
from ophyd.status import DeviceStatus

from devices import deadlines
from devices.transport import FaultCallback, LineTransport
from sdl.exceptions import InstrumentError, InstrumentRejected

__all__ = ["LineDevice"]

logger = logging.getLogger(__name__)

POLL_BACKOFF_START = 0.0005
"""Seconds of the first ``STATUS`` poll wait when the instrument gives no ``remaining_s``."""


class LineDevice(Device):  # type: ignore[misc] # ophyd ships no type information
    """Base of the Ophyd devices that drive an SDL/1 instrument.

    Args:
        prefix: Unused (Ophyd convention).
        name: Device name (also the instrument name in errors).
        url: ``serial_for_url`` URL of the instrument.
        timeout: Seconds a job may take before its Status fails (finite on purpose).
        poll_interval: Seconds between ``STATUS`` polls.
        line_timeout: Seconds to wait for one reply line.
        retries: Transport retries (see ``devices/PROTOCOL.md``).
        busy_timeout: Seconds to wait while the instrument answers ``BUSY``.
        on_fault: Told about every line fault (kind, message).
        transport: Use this transport instead of building one.
    """

    #: Protocol verb of this device's jobs (``SYNTH`` or ``MEASURE``).
    verb: ClassVar[str]

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        url: str,
        timeout: float,
        poll_interval: float = 0.05,
        line_timeout: float = 2.0,
        retries: int = 3,
        busy_timeout: float = 30.0,
        on_fault: FaultCallback | None = None,
        transport: LineTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(prefix, name=name, **kwargs)
        if timeout <= 0:
            raise ValueError(f"{timeout=} must be > 0 (a Status needs a finite timeout)")
        self.url = url
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.transport = transport or LineTransport(
            url, instrument=name, timeout=line_timeout, retries=retries, busy_timeout=busy_timeout, on_fault=on_fault
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-line")
        self._active: str | None = None
        self._active_lock = threading.Lock()

    def _submit(
        self, job_id: str, body: dict[str, Any], run: Callable[[str, dict[str, Any], DeviceStatus], None]
    ) -> DeviceStatus:
        """Mark ``job_id`` active and run ``run(job_id, body, status)`` on the line's worker."""
        status = deadlines.arm(DeviceStatus(self), self.timeout)  # one watcher thread for all, not one each
        with self._active_lock:
            self._active = job_id
        self._worker.submit(run, job_id, body, status)
        return status

    def _job_result(
        self, job_id: str, body: dict[str, Any], status: DeviceStatus, on_running: Callable[[], None] | None = None
    ) -> dict[str, Any] | None:
        """Start the job, poll it while it runs, and return its result (``None`` if the Status ended first)."""
        data = self.transport.command(f"{self.verb} START", job_id, body).data or {}
        if data.get("duplicate"):
            logger.info("%s: job %s was already known to the instrument (state %s)", self.name, job_id,
                        data.get("state"))
        state = data.get("state")
        # Sleep what the instrument says is left (capped at the poll interval); without a usable
        # estimate back off from 0.5 ms, so a job that ends at once costs no fixed wait.
        backoff = POLL_BACKOFF_START
        while state == "running" and not status.done:
            if on_running is not None:
                on_running()
            time.sleep(min(self.poll_interval, max(backoff, float(data.get("remaining_s") or 0.0))))
            backoff = min(2 * backoff, self.poll_interval)
            data = self.transport.command(f"{self.verb} STATUS", job_id).data or {}
            state = data.get("state")
        if status.done:  # timed out or stopped meanwhile
            return None
        return self.transport.command(f"{self.verb} RESULT", job_id).data or {}

    def _release(self) -> None:
        """Forget the active job (it ended)."""
        with self._active_lock:
            self._active = None

    def _aborted(self) -> None:
        """Hook run after a successful abort (e.g. to publish a state)."""

    def stop(self, *, success: bool = False) -> None:
        """Abort the running job on the instrument (``<VERB> ABORT``); best effort."""
        with self._active_lock:
            job_id, self._active = self._active, None
        if job_id is None:
            return
        try:
            self.transport.command(f"{self.verb} ABORT", job_id)
            self._aborted()
        except InstrumentError as exc:
            logger.warning("%s: could not abort job %s: %s", self.name, job_id, exc)

    # -- the instrument port of sdl.lab.instruments ---------------------------------------------
    def job(self, job_id: str) -> dict[str, Any]:
        """The instrument's record of ``job_id`` (``JOB?``) after a crash or a retry.

        Returns:
            The job record (``state`` is ``running``, ``done``, ``failed`` or ``aborted``, plus
            ``recipe``, ``result``, ``failure``, ``error``), or ``{"job_id": job_id, "state":
            "unknown"}`` when the instrument never saw it (safe to start).
        """
        try:
            return dict(self.transport.command("JOB?", job_id).data or {})
        except InstrumentRejected as exc:
            if "NOT_FOUND" in str(exc):
                return {"job_id": job_id, "state": "unknown"}
            raise

    def abort(self, job_id: str) -> None:
        """Abort ``job_id`` on the instrument (``<VERB> ABORT``), whether or not this client started it."""
        with self._active_lock:
            if self._active == job_id:
                self._active = None
        self.transport.command(f"{self.verb} ABORT", job_id)
        self._aborted()

    def ping(self) -> None:
        """Raise an :class:`InstrumentError` unless the instrument answers ``*IDN?`` now (one try)."""
        retries, self.transport.retries = self.transport.retries, 0
        try:
            self.transport.open()
            self.transport.identify()
        finally:
            self.transport.retries = retries

    def close(self) -> None:
        """Close the serial line and the worker."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.transport.close()
