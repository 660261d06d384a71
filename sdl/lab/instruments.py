"""The lab's side of the hardware boundary: the instrument port, the pool of free instruments, outages.

Why a port: the lab never speaks a wire protocol. Everything it asks of an instrument beyond a
Bluesky plan (what became of a job after a crash, abort a job, are you there) goes through the
small :class:`InstrumentPort` that the Ophyd devices of ``devices/`` implement; a campaign may name
another device class in its YAML (``driver: package.module:Class``) without touching the lab.

Why outages are not faults: an instrument that cannot be reached or stops answering has not lost
the sample; the experiment waits for it (like a Bluesky suspender holds a plan), retrying with
back-off for the instrument's ``outage_window_s``, and only then does the campaign fail, with one
line naming the instrument and its URL. Experiments waiting for it keep their state in the
repository, so the next run picks them up; none is abandoned, so no failure budget is spent.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from sdl.exceptions import InstrumentConnectionError, InstrumentError, InstrumentTimeout, SDLError

__all__ = [
    "ROBOT",
    "STATION",
    "InstrumentOutage",
    "InstrumentPool",
    "InstrumentPort",
    "OutageGuard",
    "is_outage",
    "load_driver",
]

logger = logging.getLogger(__name__)

ROBOT = "synthesis"
STATION = "characterization"


@runtime_checkable
class InstrumentPort(Protocol):
    """What the lab needs of an instrument besides running plans on it (an Ophyd device).

    ``job`` returns the instrument's record of a job (``state``: ``unknown`` when it never saw it,
    ``running``, ``done``, ``failed``, ``aborted``; plus ``failure`` and ``error``). ``abort`` ends a
    job on the instrument (best effort). ``ping`` raises an :class:`InstrumentError` unless the
    instrument answers.
    """

    name: str
    url: str

    def job(self, job_id: str) -> dict[str, Any]: ...

    def abort(self, job_id: str) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class InstrumentOutage(SDLError):
    """An instrument stayed unreachable for longer than its outage window: the campaign fails.

    Not an :class:`InstrumentError` on purpose: it is never retried and never abandons an experiment.
    """

    def __init__(self, message: str, *, instrument: str, url: str | None) -> None:
        super().__init__(message)
        self.instrument = instrument
        self.url = url


def is_outage(exc: BaseException | None) -> bool:
    """An error that says "the instrument is not there" (cannot connect, no reply) rather than a fault."""
    return isinstance(exc, InstrumentConnectionError | InstrumentTimeout)


def load_driver(driver: str, role: str) -> Callable[..., InstrumentPort]:
    """The device class of a YAML ``driver``: ``sdl-line`` (devices/) or ``package.module:Class``.

    Raises:
        SDLError: The class cannot be imported (the message names the driver).
    """
    if driver == "sdl-line":
        if role == ROBOT:
            from devices.robot import SynthesisRobot

            return SynthesisRobot
        from devices.station import CharacterizationStation

        return CharacterizationStation
    module_name, _, class_name = driver.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise SDLError(f"instrument driver {driver!r} cannot be imported: {exc}") from exc
    if not callable(cls):
        raise SDLError(f"instrument driver {driver!r} is not a class")
    return cls  # type: ignore[no-any-return]


def _what(error: BaseException) -> str:
    """The error without the ``[instrument at url]`` prefix (the outage message names both)."""
    return str(getattr(error, "message", None) or error)


@dataclass
class _Health:
    down_since: float | None = None
    error: str = ""
    failed: bool = False


class OutageGuard:
    """Holds work on instruments that cannot be reached, with back-off, for their outage window.

    Args:
        windows: Outage window per instrument, seconds.
        on_change: Told ``(instrument, "down" | "up" | "gone", message)`` (the event log).
        first_delay: First wait between two pings; doubles up to ``max_delay``.
        max_delay: Longest wait between two pings.
    """

    def __init__(
        self,
        windows: dict[str, float],
        on_change: Callable[[str, str, str], None] | None = None,
        *,
        first_delay: float = 0.25,
        max_delay: float = 10.0,
    ) -> None:
        self.windows = dict(windows)
        self.on_change = on_change
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._health = {name: _Health() for name in windows}
        self._locks = {name: threading.Lock() for name in windows}
        self._stop = threading.Event()

    def is_down(self, name: str) -> bool:
        """Whether ``name`` is known to be unreachable right now."""
        health = self._health.get(name)
        return health is not None and health.down_since is not None

    def cancel(self) -> None:
        """Stop every wait (the campaign is failing or interrupted)."""
        self._stop.set()

    def wait_until_up(self, device: InstrumentPort, error: BaseException) -> None:
        """Block until ``device`` answers again; raise :class:`InstrumentOutage` after its window.

        Several workers may wait for one instrument: one pings, the others wait for its verdict.
        """
        name = device.name
        health = self._health.setdefault(name, _Health())
        lock = self._locks.setdefault(name, threading.Lock())
        window = self.windows.get(name, 0.0)
        with lock:
            if health.failed:
                raise self._outage(device, health)
            if health.down_since is None:
                health.down_since = time.monotonic()
                health.error = _what(error)
                logger.warning("instrument %s (%s) is not answering: %s; waiting up to %g s for it",
                               name, device.url, health.error, window)
                self._tell(name, "down", f"{name} ({device.url}) is not answering: {health.error}; "
                                         f"holding its work for up to {window:g} s")
            delay = self.first_delay
            while True:
                try:
                    device.ping()
                except InstrumentError as exc:
                    health.error = _what(exc)
                else:
                    seconds = time.monotonic() - health.down_since
                    health.down_since = None
                    logger.warning("instrument %s (%s) answers again after %.1f s", name, device.url, seconds)
                    self._tell(name, "up", f"{name} ({device.url}) answers again after {seconds:.1f} s")
                    return
                left = health.down_since + window - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    health.failed = True
                    outage = self._outage(device, health)
                    self._tell(name, "gone", str(outage))
                    raise outage
                if self._stop.wait(min(delay, left)):
                    continue
                delay = min(2 * delay, self.max_delay)

    def _outage(self, device: InstrumentPort, health: _Health) -> InstrumentOutage:
        window = self.windows.get(device.name, 0.0)
        return InstrumentOutage(
            f"instrument {device.name} at {device.url} did not answer for {window:g} s (outage_window_s): "
            f"{health.error}", instrument=device.name, url=device.url,
        )

    def _tell(self, name: str, what: str, message: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(name, what, message)
            except Exception:
                logger.exception("outage callback failed")


class InstrumentPool:
    """Free instruments by role; each instrument serves one experiment at a time.

    Why a pool and not a lock per instrument: with several robots, an experiment takes *any* free
    robot (one that is not down), except an experiment whose job a given robot already knows (a
    retry or a resumed experiment), which must go back to that robot.

    Args:
        instruments: ``{name: (role, device)}``.
        on_release: Called (no arguments) whenever an instrument is given back.
        guard: Knows which instruments are down (they are not handed out while another is free).
    """

    def __init__(
        self,
        instruments: dict[str, tuple[str, InstrumentPort]],
        on_release: Callable[[], None] | None = None,
        guard: OutageGuard | None = None,
    ) -> None:
        self.devices: dict[str, InstrumentPort] = {name: dev for name, (_, dev) in instruments.items()}
        self.roles: dict[str, str] = {name: role for name, (role, _) in instruments.items()}
        self.guard = guard
        self._free: set[str] = set(self.roles)
        self._cond = threading.Condition()
        self.on_release = on_release
        self._closed: str | None = None

    def names(self, role: str) -> list[str]:
        """Names of the instruments with ``role``, in configuration order."""
        return [n for n, r in self.roles.items() if r == role]

    def count(self, role: str) -> int:
        """Number of instruments with ``role``."""
        return len(self.names(role))

    def free(self, role: str) -> int:
        """Number of instruments of ``role`` free right now."""
        with self._cond:
            return sum(1 for n in self._free if self.roles[n] == role)

    def close_leases(self, reason: str) -> None:
        """Make every waiting and later :meth:`lease` raise ``SDLError(reason)`` (the campaign ends)."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    @contextlib.contextmanager
    def lease(self, role: str, name: str | None = None) -> Iterator[tuple[str, InstrumentPort]]:
        """Borrow a free instrument of ``role`` (or exactly ``name``); blocks until one frees.

        Yields:
            ``(name, device)``.
        """
        candidates = [name] if name is not None else self.names(role)
        if not candidates or any(c not in self.roles for c in candidates):
            raise SDLError(f"no instrument {name or ''} with role {role!r} in this campaign".replace("  ", " "))
        with self._cond:
            while True:
                if self._closed is not None:
                    raise SDLError(self._closed)
                free = [c for c in candidates if c in self._free]
                up = [c for c in free if self.guard is None or not self.guard.is_down(c)]
                if up or free:
                    taken = (up or free)[0]
                    self._free.discard(taken)
                    break
                self._cond.wait(1.0)
        try:
            yield taken, self.devices[taken]
        finally:
            with self._cond:
                self._free.add(taken)
                self._cond.notify_all()
            if self.on_release is not None:
                self.on_release()
