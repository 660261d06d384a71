"""SIGINT and SIGTERM for a running campaign: stop cleanly, lose nothing.

Why not the default ``KeyboardInterrupt``: raised at a random point of the main thread, it tears
through the flow while worker threads are mid-plan, and the experiments in flight end up abandoned.
Instead the first Ctrl-C asks every open lab to *drain* (propose nothing more, start nothing new,
let started jobs finish and be recorded); a second Ctrl-C, or SIGTERM (``docker stop``, systemd),
asks them to *abort* (jobs aborted on the instruments and recorded as abandoned). Experiments not
yet started stay ``proposed``; the next ``sdl run`` resumes them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdl.lab.laboratory import Lab

__all__ = ["Interrupts", "handle_interrupts", "register"]

logger = logging.getLogger(__name__)

_LABS: weakref.WeakSet[Lab] = weakref.WeakSet()
_LOCK = threading.Lock()


class Interrupts:
    """What the signal handlers received so far (``kind`` is ``drain`` or ``abort``)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.signal_name: str | None = None
        self.count = 0

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        if self.signal_name is None:
            return 0
        return 128 + int(getattr(signal, self.signal_name))


_CURRENT: Interrupts | None = None


def register(lab: Lab) -> None:
    """Let the handlers reach ``lab`` (a request that came before it opened applies at once)."""
    with _LOCK:
        _LABS.add(lab)
        current = _CURRENT
    if current is not None and current.kind is not None:
        lab.interrupt(current.kind, str(current.signal_name))


def _deliver(state: Interrupts, kind: str, name: str) -> None:
    state.kind = "abort" if kind == "abort" or state.kind == "abort" else kind
    state.signal_name = name
    with _LOCK:
        labs = list(_LABS)
    for lab in labs:
        lab.interrupt(state.kind, name)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[Interrupts]:
    """Install the SIGINT / SIGTERM handlers for the block (main thread only; elsewhere a no-op)."""
    global _CURRENT
    state = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        state.count += 1
        if state.count == 1:
            logger.warning("Ctrl-C: finishing the experiments in flight (Ctrl-C again aborts them)")
            _deliver(state, "drain", "SIGINT")
        else:
            logger.warning("Ctrl-C again: aborting the jobs in flight; they are recorded as abandoned")
            _deliver(state, "abort", "SIGINT")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        logger.warning("SIGTERM: aborting the jobs in flight; they are recorded as abandoned")
        _deliver(state, "abort", "SIGTERM")

    old_int = signal.signal(signal.SIGINT, on_sigint)
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    _CURRENT = state
    try:
        yield state
    finally:
        _CURRENT = None
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
