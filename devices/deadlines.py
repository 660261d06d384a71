"""One thread that fails every overdue device Status, instead of one thread per Status.

Why: an Ophyd ``Status`` built with ``timeout=`` starts its own thread to watch the clock, and a
device job makes one per step; starting (and scheduling) those threads was a measurable part of
each experiment's software time on a loaded machine. Here a Status is armed with a deadline on a
heap watched by a single daemon thread; when it passes with the Status still running, the Status
fails with :class:`~sdl.exceptions.InstrumentTimeout` (what ``sdl.lab.runner`` made of Ophyd's
own timeout, which Ophyd does not let anyone else set), and ``DeviceStatus`` still calls the
device's ``stop()``.
The failure runs on a short-lived thread of its own: ``stop()`` talks to the instrument and must
not hold up the other deadlines.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any

__all__ = ["arm"]

logger = logging.getLogger(__name__)

_condition = threading.Condition()
_heap: list[tuple[float, int, Any, float]] = []
_counter = itertools.count()
_thread: threading.Thread | None = None


def arm(status: Any, timeout: float) -> Any:
    """Fail ``status`` with ``InstrumentTimeout`` unless it is done within ``timeout`` seconds.

    Returns:
        The status, for ``status = arm(DeviceStatus(device), timeout)``.
    """
    global _thread
    deadline = time.monotonic() + float(timeout)
    with _condition:
        heapq.heappush(_heap, (deadline, next(_counter), status, float(timeout)))
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_watch, name="status-deadlines", daemon=True)
            _thread.start()
        elif _heap[0][2] is status:  # the earliest deadline changed: wake the watcher
            _condition.notify()
    return status


def _watch() -> None:
    while True:
        with _condition:
            while True:
                while _heap and _heap[0][2].done:  # finished in time: forget it
                    heapq.heappop(_heap)
                now = time.monotonic()
                if _heap and _heap[0][0] <= now:
                    _, _, status, timeout = heapq.heappop(_heap)
                    break
                _condition.wait(None if not _heap else min(_heap[0][0] - now, 1.0))
        threading.Thread(target=_expire, args=(status, timeout), name="status-timeout", daemon=True).start()


def _expire(status: Any, timeout: float) -> None:
    from ophyd.utils.errors import InvalidState

    from sdl.exceptions import InstrumentTimeout

    if status.done:
        return
    device = getattr(status, "device", None)
    error = InstrumentTimeout(f"no result within the status timeout of {timeout} s",
                              instrument=getattr(device, "name", None), url=getattr(device, "url", None))
    try:
        status.set_exception(error)
    except InvalidState:  # finished between the check and the call
        return
    except Exception:
        logger.exception("could not fail overdue status %r", status)
