"""Alerts: tell people when a campaign needs them (failed, instrument gone, goal reached, budget spent).

Why a notifier of its own, off the loop's threads: a notification service that is slow or down must
never slow or stop the lab. :meth:`Notifier.send` only queues; one background thread delivers each
alert to every target with a short timeout, logs a failed delivery as a warning and goes on;
:meth:`Notifier.close` waits a bounded time for the last alerts (the campaign's end) and returns.

Targets (the YAML's ``notifications:``): apprise URLs (``json://host:port/path``, ``mailto://``,
``slack://``, ...) or Prefect notification block slugs (``slack-webhook/lab-alerts``). Blocks need
Prefect's API, so ``sdl/flows.py`` registers their sender with :func:`register_prefect_bridge`
(this module never imports prefect); without it a block target is skipped with a warning. Secrets
stay ``${VAR}`` references in the config and the repository; they are expanded here, when sent.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from sdl.config import expand_env_vars

if TYPE_CHECKING:
    from sdl.lab.laboratory import Lab

__all__ = [
    "Alert",
    "AlertEvent",
    "CampaignAlerts",
    "Notifier",
    "PrefectBridge",
    "end_event",
    "register_prefect_bridge",
]

logger = logging.getLogger(__name__)

AlertEvent = Literal[
    "campaign.failed",
    "instrument.down",
    "campaign.goal_reached",
    "campaign.budget_spent",
    "campaign.stopped",
    "campaign.interrupted",
    "campaign.cancelled",
]
Level = Literal["info", "success", "warning", "failure"]

_LEVELS: dict[str, Level] = {
    "campaign.failed": "failure",
    "instrument.down": "failure",
    "campaign.goal_reached": "success",
    "campaign.budget_spent": "success",
    "campaign.stopped": "info",
    "campaign.interrupted": "warning",
    "campaign.cancelled": "warning",
}
_HEADLINES: dict[str, str] = {
    "campaign.failed": "failed",
    "instrument.down": "instrument down",
    "campaign.goal_reached": "goal reached",
    "campaign.budget_spent": "budget spent",
    "campaign.stopped": "stopped",
    "campaign.interrupted": "interrupted",
    "campaign.cancelled": "cancelled",
}


class PrefectBridge(Protocol):
    """What only the Prefect layer can do for alerts: send to a block, name the flow run."""

    def send_to_block(self, slug: str, title: str, body: str) -> None:
        """Load the notification block ``slug`` (``block-type/name``) and send; raise on failure."""
        ...

    def run_link(self) -> str | None:
        """The current flow run's UI address (or its id), None outside a flow run."""
        ...


_BRIDGE: list[PrefectBridge] = []


def register_prefect_bridge(bridge: PrefectBridge) -> None:
    """Let alerts reach Prefect notification blocks and link to the flow run (``sdl/flows.py``)."""
    _BRIDGE[:] = [bridge]


@dataclass(frozen=True)
class Alert:
    """One notification: what happened to which campaign, in a title and a few lines of body.

    Attributes:
        event: What happened (:data:`AlertEvent`).
        campaign: Campaign name.
        message: The one line that says why (the stop reason, the instrument's outage).
        details: ``label: value`` lines (ids, counts, best so far, link), in order.
    """

    event: AlertEvent
    campaign: str
    message: str
    details: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """``sdl: campaign demo failed`` / ``sdl: demo: instrument down``."""
        return f"sdl: campaign {self.campaign} {_HEADLINES[self.event]}"

    @property
    def body(self) -> str:
        lines = [self.message, "", f"event: {self.event}", f"campaign: {self.campaign}"]
        lines += [f"{label}: {value}" for label, value in self.details.items()]
        return "\n".join(lines)

    @property
    def level(self) -> Level:
        return _LEVELS[self.event]


def end_event(state: str, *, interrupted: bool, goal_reached: bool, budget_spent: bool) -> AlertEvent:
    """The alert for how a campaign ended (:meth:`sdl.lab.Lab.finish`'s state); goal beats budget."""
    if state == "failed":
        return "campaign.failed"
    if state == "cancelled":  # `sdl cancel` / the UI's Cancel button, when the lab records it so
        return "campaign.cancelled"
    if interrupted:
        return "campaign.interrupted"
    if goal_reached:
        return "campaign.goal_reached"
    if budget_spent:
        return "campaign.budget_spent"
    return "campaign.stopped"


_STOP = object()


class Notifier:
    """Delivers alerts to a campaign's targets from one background thread; never raises, never blocks.

    Args:
        targets: The YAML's ``notifications`` (``${VAR}`` unexpanded).
        timeout_s: Connect and read timeout of one delivery.
        on_result: Told ``(alert, target as shown, error or None)`` after each delivery (the event log).
    """

    def __init__(self, targets: Sequence[str], *, timeout_s: float = 5.0,
                 on_result: Callable[[Alert, str, str | None], None] | None = None) -> None:
        self.targets = list(targets)
        self.timeout_s = timeout_s
        self.on_result = on_result
        self.sent: list[tuple[str, str]] = []  # (event, target) delivered, for the log and tests
        self.failed: list[tuple[str, str, str]] = []  # (event, target, why)
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Prefect's settings (which API a block is loaded from) live in context variables.
        self._context = contextvars.copy_context()

    def send(self, alert: Alert) -> None:
        """Queue ``alert`` for every target (no-op without targets)."""
        if not self.targets:
            return
        logger.info("alert %s for campaign %s: %s", alert.event, alert.campaign, alert.message)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sdl-alerts", daemon=True)
                self._thread.start()
        self._queue.put(alert)

    def close(self, wait_s: float = 15.0) -> None:
        """Deliver what is queued, waiting at most ``wait_s`` seconds; later alerts are dropped."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(wait_s)
        if thread.is_alive():
            logger.warning("alerts: gave up waiting %g s for the notification targets to answer", wait_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, Alert)
            for target in self.targets:
                try:
                    self._context.run(self._deliver, item, target)
                except RuntimeError:  # the context is entered by an older sender still waiting on a target
                    self._deliver(item, target)

    def _deliver(self, alert: Alert, target: str) -> None:
        shown = _shown(target)
        try:
            if "://" in target:
                self._to_apprise(alert, expand_env_vars(target))
            elif _BRIDGE:
                _BRIDGE[0].send_to_block(target, alert.title, alert.body)
            else:
                raise RuntimeError("Prefect notification blocks are reached only from `sdl run` (the flow)")
        except Exception as exc:  # noqa: BLE001 - a dead notification service must not stop the lab
            self.failed.append((alert.event, shown, str(exc)))
            logger.warning("alert %s not delivered to %s: %s", alert.event, shown, exc)
            error: str | None = str(exc)
        else:
            self.sent.append((alert.event, shown))
            error = None
        if self.on_result is not None:
            try:
                self.on_result(alert, shown, error)
            except Exception:
                logger.exception("alert result callback failed")

    def _to_apprise(self, alert: Alert, url: str) -> None:
        import apprise

        service = apprise.Apprise.instantiate(url)
        if service is None:
            raise RuntimeError("apprise cannot use this URL")
        service.socket_connect_timeout = self.timeout_s
        service.socket_read_timeout = self.timeout_s
        if not service.notify(body=alert.body, title=alert.title, notify_type=apprise.NotifyType(alert.level)):
            raise RuntimeError("the service did not accept it (apprise's log says why)")


def _shown(target: str) -> str:
    """A target as logs may show it: the unexpanded text, with any literal password masked."""
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", target)


def link_for_alert() -> str | None:
    """The current flow run's link, when the Prefect layer is there to say it."""
    if not _BRIDGE:
        return None
    try:
        return _BRIDGE[0].run_link()
    except Exception:  # a missing link is no reason to lose the alert
        logger.debug("no flow run link for the alert", exc_info=True)
        return None


class CampaignAlerts:
    """A lab's alerts: the hooks :class:`~sdl.lab.laboratory.Lab` calls, each one line there.

    Every alert carries the campaign's id, its experiments so far, the best so far and, inside a
    Prefect flow run, the run's link. The end of a campaign is told once; a rerun that finds the
    campaign already finished (nothing new ended) tells nothing, except a failure.

    Args:
        lab: The campaign's lab (read only: config, ledger, best so far).
        notifier: Delivery (default: a :class:`Notifier` on ``lab.cfg.notifications``).
    """

    def __init__(self, lab: Lab, notifier: Notifier | None = None) -> None:
        self.lab = lab
        self.notifier = notifier if notifier is not None else Notifier(lab.cfg.notifications,
                                                                       on_result=self._record)
        self._ended_at_start = 0
        self._end_told = False

    def started(self) -> None:
        """Remember what had ended before this run (so that a rerun of a finished campaign is quiet)."""
        self._ended_at_start = self.lab.n_ended

    def instrument_event(self, instrument: str, what: str, message: str) -> None:
        """An :class:`~sdl.lab.instruments.OutageGuard` change; only ``gone`` (past its window) alerts."""
        if what == "gone":
            self._send("instrument.down", message, instrument=instrument)

    def ended(self, state: str, reason: str) -> None:
        """:meth:`Lab.finish`: one alert for how the campaign ended."""
        lab = self.lab
        if self._end_told or (state not in ("failed", "cancelled") and lab.interrupted is None
                              and lab.n_ended <= self._ended_at_start):
            return
        goal = lab.cfg.stopping.goal_value
        event = end_event(state, interrupted=lab.interrupted is not None,
                          goal_reached=goal is not None and lab.objective.reached(lab.ledger.best_value, goal),
                          budget_spent=lab.n_ended >= lab.budget)
        self._end_told = True
        self._send(event, reason)

    def crashed(self, error: BaseException) -> None:
        """The run ended on an error before :meth:`ended` (a bug, a lost database): it failed."""
        if not self._end_told:
            self._end_told = True
            self._send("campaign.failed", f"the run stopped on an error: {type(error).__name__}: {error}")

    def close(self) -> None:
        """Deliver the last alerts (bounded wait)."""
        self.notifier.close()

    def _record(self, alert: Alert, target: str, error: str | None) -> None:
        """Each delivery in the repository's event log: who was told what, or why not."""
        what = f"{alert.event} to {target}" + (f" not delivered: {error}" if error else "")
        self.lab.event("alert.failed" if error else "alert.sent", what, level="warning" if error else "info",
                       payload={"event": alert.event, "target": target, "title": alert.title, "error": error})

    def _send(self, event: AlertEvent, message: str, **details: str) -> None:
        if not self.notifier.targets:
            return
        try:
            self.notifier.send(Alert(event, self.lab.cfg.name, message, {**details, **self._details()}))
        except Exception:  # monitoring must not stop the lab
            logger.exception("could not prepare the %s alert", event)

    def _details(self) -> dict[str, str]:
        lab = self.lab
        counts = lab.counts()
        unit = f" {lab.cfg.objective.unit}" if lab.cfg.objective.unit else ""
        best = lab.best() if lab.campaign_id else None
        details = {
            "campaign id": str(lab.campaign_id),
            "experiments": f"{lab.n_ended} of {lab.budget} ended ({counts['completed']} completed, "
                           f"{counts['failed']} failed, {counts['abandoned']} abandoned, "
                           f"{counts['proposed'] + counts['running']} in flight)",
            "best so far": "nothing measured yet" if best is None else (
                f"{lab.property} = {best.value:.4g}{unit} ({best.candidate_key}, experiment {best.experiment_id})"),
        }
        link = link_for_alert()
        if link:
            details["flow run"] = link
        return details
