"""Pause, resume and cancel a running campaign from another process: the runner's side.

Why polling the repository: ``sdl pause/resume/cancel`` may run on another host, and in ephemeral
Prefect mode there is no server to send anything through. The runner reads the campaign's control
row about once a second from its loop (:func:`sdl.lab.loop.drive`) and acts on it:

* ``paused``: nothing new is proposed or started; experiments already handed to a worker finish
  and are recorded. The flow run stays Running (its log says it is paused).
* ``running`` again: the loop proposes as before.
* ``cancelling``: the same path as SIGTERM (:meth:`Lab.interrupt` ``abort``): jobs in flight are
  aborted on their instruments and recorded abandoned, experiments not started stay proposed,
  the flow run ends Cancelled and the control row says ``cancelled``. ``sdl run`` resumes it.

Other sources of a cancel (the Prefect UI's Cancel button, seen as a Cancelling flow run) are
plain callables registered with :meth:`LabControl.watch`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sdl.repository.control import control_of, reset_control, set_control

if TYPE_CHECKING:
    from sdl.lab.laboratory import Lab

__all__ = ["CancelCheck", "LabControl"]

logger = logging.getLogger(__name__)

CancelCheck = Callable[[], str | None]
"""Returns who / what cancelled the campaign (e.g. ``"the Prefect UI"``), or None."""


class LabControl:
    """The runner's view of its control row, read at most every ``poll_s`` seconds.

    Args:
        lab: The started lab (its campaign id is known).
        started_at: When this run began: requests older than it are from a previous run.
        poll_s: Shortest time between two reads of the repository.
    """

    def __init__(self, lab: Lab, *, started_at: dt.datetime, poll_s: float = 1.0) -> None:
        self.lab = lab
        self.poll_s = poll_s
        self.paused_by: str | None = None
        self.cancelled_by: str | None = None
        self._checks: list[CancelCheck] = []
        self._failing: set[int] = set()
        self._last = 0.0
        reset_control(lab.store, lab.campaign_id, older_than=started_at)

    def watch(self, check: CancelCheck) -> None:
        """Also cancel when ``check`` says so (polled with the repository)."""
        self._checks.append(check)

    @property
    def paused(self) -> bool:
        """Paused, and nothing else (a stop rule, a failure, an interrupt) ends the run."""
        lab = self.lab
        return (self.paused_by is not None and lab.interrupted is None and lab.ledger.stop_reason is None
                and lab.ledger.failure is None)

    def poll(self, *, force: bool = False) -> None:
        """Read the control row (and the watched checks) and act on what changed."""
        now = time.monotonic()
        if self.cancelled_by is not None or (not force and now - self._last < self.poll_s):
            return
        self._last = now
        for check in self._checks:
            try:
                who = check()
            except Exception as exc:
                if id(check) not in self._failing:  # say it once: a Prefect server away for a while
                    logger.warning("campaign %s: cannot ask %r whether it was cancelled: %s", self.lab.cfg.name,
                                   check, exc)
                    self._failing.add(id(check))
                logger.debug("cancel check %r failed", check, exc_info=True)
                continue
            self._failing.discard(id(check))
            if who:
                self.cancel(who)
                return
        try:
            row = control_of(self.lab.store, self.lab.campaign_id)
        except Exception:
            logger.warning("campaign %s: cannot read its control row", self.lab.cfg.name, exc_info=True)
            return
        if row is None:
            return
        if row.state == "cancelling":
            self.cancel(row.requested_by or "sdl cancel")
        elif row.state == "paused" and self.paused_by is None:
            self.paused_by = row.requested_by or "sdl pause"
            logger.warning("campaign %s paused by %s: the experiments in flight finish, nothing new starts "
                           "(sdl resume %s)", self.lab.cfg.name, self.paused_by, self.lab.cfg.name)
            self.lab.event("campaign.paused", f"paused by {self.paused_by}", level="warning")
        elif row.state == "running" and self.paused_by is not None:
            logger.warning("campaign %s resumed by %s", self.lab.cfg.name, row.requested_by)
            self.lab.event("campaign.resumed", f"resumed by {row.requested_by} (paused by {self.paused_by})")
            self.paused_by = None
            self.lab.notify()

    def cancel(self, who: str) -> None:
        """Abort the jobs in flight (recorded abandoned) and end the run as cancelled."""
        if self.cancelled_by is not None:
            return
        self.cancelled_by = who
        logger.warning("campaign %s cancelled by %s: aborting the jobs in flight", self.lab.cfg.name, who)
        self.lab.interrupt("abort", f"cancelled by {who}")

    def finished(self) -> None:
        """Record the end of a cancelled run in the control row (``cancelled``)."""
        if self.cancelled_by is not None:
            try:
                set_control(self.lab.store, self.lab.campaign_id, "cancelled", by=self.cancelled_by,
                            reason="jobs in flight aborted; sdl run resumes it")
            except Exception:
                logger.exception("could not record the cancellation of %s", self.lab.cfg.name)
